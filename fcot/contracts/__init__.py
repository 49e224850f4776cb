"""What the stages share, below them: the teacher's contract (config, identity, questions, sample keys and seeds),
the record store, the curated-row schema with its length rule. A stage module (fcot.teacher, fcot.curate,
fcot.train, fcot.evaluate) imports these and never another stage (tests/test_imports.py checks)."""
