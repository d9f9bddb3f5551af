"""Regenerate sample_data/ (prompts.jsonl, prompts.parquet, chat.jsonl, openai_batch.jsonl).

python3 sample_data/make_samples.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

PROMPTS = [
    ("Write a haiku about autumn leaves.", "poetry"),
    ("Explain what a hash table is in two sentences.", "cs"),
    ("What is the capital of Australia?", "facts"),
    ("Translate 'good morning' into French, Spanish and German.", "translation"),
    ("List three uses of baking soda around the house.", "household"),
    ("Summarize the plot of Romeo and Juliet in one paragraph.", "literature"),
    ("Write a Python function that reverses a string.", "code"),
    ("Why is the sky blue?", "science"),
    ("Give me a tip for staying focused while studying.", "advice"),
    ("What is 17 multiplied by 23?", "math"),
    ("Describe the smell of rain to someone who has never experienced it.", "creative"),
    ("Name the planets of the solar system in order from the sun.", "facts"),
    ("What does HTTP stand for?", "cs"),
    ("Write a limerick about a cat who loves coffee.", "poetry"),
    ("Explain photosynthesis to a ten-year-old.", "science"),
    ("Suggest a name for a bakery that sells only croissants.", "creative"),
    ("How do I convert Celsius to Fahrenheit?", "math"),
    ("What are the main differences between TCP and UDP?", "cs"),
    ("Write the opening line of a mystery novel.", "creative"),
    ("Who painted the Mona Lisa?", "facts"),
    ("Give three arguments for learning a second language.", "advice"),
    ("What is a prime number? Give five examples.", "math"),
    ("Write a SQL query that counts rows per country in a table named users.", "code"),
    ("Describe a sunset over the ocean in three sentences.", "creative"),
    ("What causes the seasons on Earth?", "science"),
    ("Explain recursion using an everyday analogy.", "cs"),
    ("What is the boiling point of water at sea level in Fahrenheit?", "facts"),
    ("Write a short thank-you note to a neighbour who watered my plants.", "writing"),
    ("List the first ten Fibonacci numbers.", "math"),
    ("What is the difference between weather and climate?", "science"),
    ("Write a bash one-liner that counts the lines of every .py file in a directory.", "code"),
    ("Recommend a hobby for someone who likes puzzles.", "advice"),
    ("What language is spoken in Brazil?", "facts"),
    ("Write a two-line dialogue between a robot and a gardener.", "creative"),
    ("Explain what an API is to a non-programmer.", "cs"),
    ("How many minutes are there in a week?", "math"),
    ("Why do cats purr?", "science"),
    ("Write a tweet announcing a new coffee shop opening.", "writing"),
    ("What is the largest ocean on Earth?", "facts"),
    ("Give a JavaScript example of an arrow function.", "code"),
    ("What is the Pythagorean theorem?", "math"),
    ("Describe the taste of a lemon without using the word sour.", "creative"),
    ("What are three tips for a good night's sleep?", "advice"),
    ("Explain the difference between a list and a tuple in Python.", "code"),
    ("Who wrote 'Pride and Prejudice'?", "literature"),
    ("Why does ice float on water?", "science"),
    ("Write a four-line poem about the moon.", "poetry"),
    ("What is the square root of 144?", "math"),
    ("Explain what a neural network is in one paragraph.", "cs"),
    ("Plan a simple three-course vegetarian dinner.", "household"),
    ("Café, naïve, jalapeño: explain where these accented words come from.", "language"),
    ("東京はどんな街ですか？一文で答えてください。", "language"),
    ("Continue the sequence: 2, 4, 8, 16, ...", "math"),
    ("Write a polite email declining a meeting invitation.", "writing"),
    (
        "Once upon a time, in a village at the edge of a great forest, there lived an old "
        "clockmaker who had never once been late. One morning, every clock in his shop stopped at "
        "the same minute. Continue the story for a few sentences.",
        "creative",
    ),
]

CHATS = [
    [{"role": "user", "content": "Hi! Can you recommend a good book about space?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the speed of light?"},
    ],
    [{"role": "user", "content": "Tell me a joke about programmers."}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why do leaves change colour in autumn?"},
    ],
    [
        {"role": "user", "content": "What is 12 squared?"},
        {"role": "assistant", "content": "12 squared is 144."},
        {"role": "user", "content": "And 13 squared?"},
    ],
    [{"role": "user", "content": "Give me a synonym for 'happy'."}],
    [
        {"role": "system", "content": "You are a helpful cooking assistant."},
        {"role": "user", "content": "How long should I boil an egg for a runny yolk?"},
    ],
    [{"role": "user", "content": "Write a haiku about a train."}],
    [{"role": "user", "content": "What does 'carpe diem' mean?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three primary colours."},
    ],
]


def main() -> None:
    rows = [{"id": f"p{i:03d}", "prompt": p, "topic": t} for i, (p, t) in enumerate(PROMPTS)]
    write_jsonl(HERE / "prompts.jsonl", rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), HERE / "prompts.parquet")
    write_jsonl(
        HERE / "chat.jsonl", [{"id": f"c{i:03d}", "messages": m} for i, m in enumerate(CHATS)]
    )
    batch = []
    for i, (prompt, _) in enumerate(PROMPTS[:6]):
        batch.append(
            {
                "custom_id": f"completion-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {
                    "model": "tokenmill",
                    "prompt": prompt,
                    "max_tokens": 32,
                    "temperature": 0,
                },
            }
        )
    for i, messages in enumerate(CHATS[:6]):
        batch.append(
            {
                "custom_id": f"chat-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "tokenmill",
                    "messages": messages,
                    "max_tokens": 32,
                    "temperature": 0.7,
                    "top_p": 0.95,
                },
            }
        )
    batch = [x for pair in zip(batch[:6], batch[6:], strict=True) for x in pair]  # interleave
    write_jsonl(HERE / "openai_batch.jsonl", batch)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
