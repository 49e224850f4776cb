"""Seeded generators for the two synthetic tasks, at any size (Wei et al. 2022; Kojima et al. 2022).

Records have the shipped files' fields (`question`, `answer`); `fcot data generate` writes them as JSONL,
which `fcot.tasks.jsonl_task` loads as a task.
"""

from __future__ import annotations

import random

# Common first names (US census style), as in the original tasks' construction.
NAMES = """Aaron Abby Adam Adrian Aisha Alan Albert Alex Alice Alisa Allen Alma Amber Amy Andre Andrea Andy Angela
Anita Ann Anna Annie Anthony April Arthur Ashley Audrey Barbara Barry Ben Benito Bernard Beth Betty Bianca Bill Billy
Bobby Bonnie Brad Brandon Brenda Brent Brian Bridget Brooke Bruce Bryan Caleb Calvin Carl Carla Carlos Carmen Carol
Carrie Casey Cathy Cecilia Chad Charles Cheryl Chris Cindy Claire Clara Colin Connie Craig Cristina Crystal Curtis
Cynthia Dale Dan Dana Daniel Danny Darla Darren Dave Dawn Dean Debbie Denise Dennis Derek Devon Diana Diane Dolores
Don Donna Doris Doug Dylan Eddie Edgar Edith Edwin Eileen Elaine Eleanor Elena Eli Elisa Ellen Elsa Emily Emma Eric
Erika Erin Ernest Esther Ethan Eva Evan Faith Fanny Felix Fernando Fiona Frank Gabriel Gail Gary Gene George Gerald
Gina Giselle Glen Gloria Gordon Grace Greg Gwen Hannah Harold Hazel Heather Helen Henry Holly Howard Ian Irene Isaac
Ivan Jack Jacob Jake James Jamie Jan Jane Janet Jasmine Jason Jay Jean Jeff Jeffery Jen Jenny Jeremy Jesse Jill Jim
Joan Joe Joel John Jon Jose Joseph Josh Joy Joyce Juan Judy Julia Julie June Justin Karen Kate Katie Keith Kelly Ken
Kevin Kim Kirk Kyle Lance Lara Larry Laura Leah Lee Leo Leon Leslie Lila Linda Lisa Lloyd Lois Lola Lori Louis Lucy
Luis Luke Lydia Lynn Mabel Marc Marcia Margo Maria Marie Mario Mark Marta Martin Mary Mason Matt Max Megan Mia Mike
Miles Molly Monica Nancy Nathan Neil Nick Nina Noah Noel Nora Norma Olga Oliver Omar Oscar Owen Pablo Pam Patty Paul
Paulina Pedro Peggy Penny Pete Phil Phyllis Quinn Rachel Ralph Ramon Randy Ray Rebecca Regina Rena Rex Rhonda Rick
Rita Rob Robin Rodney Roger Ron Rosa Rosalinda Rose Roy Ruby Russell Ruth Ryan Sally Sam Sandra Sara Scott Sean Seth
Shane Sharon Shawn Sheila Shirley Simon Sonia Stacy Stan Stella Steve Stuart Sue Susan Tammy Tara Ted Teresa Terry
Thelma Theo Tina Tj Todd Tom Tony Tracy Travis Trent Troy Val Vera Vicky Victor Vince Violet Wade Walter Wanda Wayne
Wendy Whitney Will Willie Yvonne Zach Zoe""".split()


def _people(rng: random.Random, n_people: int) -> list[str]:
    return rng.sample(NAMES, n_people)


def generate_coin_flip(n: int, seed: int = 0, n_people: int = 4) -> list[dict]:
    """Records like coin_flip.json's examples: heads up, each person flips or not; answer yes/no."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts, flips = [], 0
        for name in _people(rng, n_people):
            if rng.random() < 0.5:
                parts.append(f"{name} flips the coin.")
                flips += 1
            else:
                parts.append(f"{name} does not flip the coin.")
        question = ("A coin is heads up. " + " ".join(parts)
                    + ' Is the coin still heads up? Note that "flip" here means "reverse".')
        out.append({"question": question, "answer": "yes" if flips % 2 == 0 else "no"})
    return out


def generate_last_letters(n: int, seed: int = 0, n_words: int = 4) -> list[dict]:
    """Records like last_letters.json's examples: concatenate the last letters of the names."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        names = _people(rng, n_words)
        question = f'Take the last letters of each words in "{" ".join(names)}" and concatenate them.'
        out.append({"question": question, "answer": "".join(name[-1] for name in names)})
    return out
