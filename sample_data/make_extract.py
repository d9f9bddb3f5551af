"""Regenerate sample_data/extract.jsonl: 200 short texts about people, for field extraction.

python3 sample_data/make_extract.py

Each row has the text and the facts it states (name, age, city, job), so an extraction run can
be scored: `tokenmill generate sample_data/extract.jsonl --chat --json-schema
sample_data/person.schema.json --keep-columns answer`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = [
    "Maria Lopez",
    "Kenji Tanaka",
    "Amara Okafor",
    "Lars Nilsson",
    "Priya Sharma",
    "Tom Becker",
    "Sofia Rossi",
    "Omar Haddad",
    "Chen Wei",
    "Ana Silva",
]
CITIES = [
    "Madrid",
    "Osaka",
    "Lagos",
    "Stockholm",
    "Mumbai",
    "Hamburg",
    "Turin",
    "Beirut",
    "Chengdu",
    "Porto",
]
JOBS = [
    "nurse",
    "teacher",
    "engineer",
    "baker",
    "pilot",
    "lawyer",
    "chef",
    "farmer",
    "architect",
    "librarian",
]
TEMPLATES = [
    "{name}, {age}, works as a {job} in {city}.",
    "Meet {name}: a {age}-year-old {job} living in {city}.",
    "In {city}, {name} ({age}) has been a {job} for years.",
    "{name} is {age} years old and earns a living as a {job} in {city}.",
]


def main() -> None:
    rng = random.Random(0)
    with open(HERE / "extract.jsonl", "w") as f:
        for i in range(200):
            fact = {
                "name": rng.choice(NAMES),
                "age": rng.randint(19, 78),
                "city": rng.choice(CITIES),
                "job": rng.choice(JOBS),
            }
            text = rng.choice(TEMPLATES).format(**fact)
            prompt = f"Extract the person's name, age, city and job as JSON.\nText: {text}"
            f.write(json.dumps({"id": f"x{i:03d}", "prompt": prompt, "answer": fact}) + "\n")


if __name__ == "__main__":
    main()
