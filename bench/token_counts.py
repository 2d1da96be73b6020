"""How far the gateway's two token counts are from the model's tokenizer.

    .venv/bin/python bench/token_counts.py

- The reservation estimate (shared/token_estimate.py: words, numbers and punctuation one token
  each, every CJK character one token) sizes a request before the upstream call.
- The count for answers without usage (shared/quota/tokenizer.py) uses tiktoken with the model's
  encoding: the same BPE the model uses, so for answer text it is the model's own count.

The texts: the simulator's replies (every request of a small run), the README's examples, and
Japanese and code samples of the kind the company's apps send. Prints, per encoding and per kind
of text, the rough estimate's mean and worst relative error against the BPE count.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.local.simulator import generator  # noqa: E402
from shared.quota import tokenizer  # noqa: E402
from shared.token_estimate import count_tokens  # noqa: E402

JAPANESE = [
    "関所は昔の街道の検問所です。すべての通行人を確認しました。",
    "来月の出張申請について、経費精算のルールを教えてください。",
    "この資料は社外秘です。取り扱いには注意してください。",
    "東京から大阪までの新幹線の所要時間はどのくらいですか？",
    "顧客の問い合わせ履歴を要約し、次に取るべき対応を三つ挙げてください。",
]
CODE = [
    "def total(items):\n    return sum(item.price * item.quantity for item in items if item.active)\n",
    "SELECT app_id, SUM(total_tokens) FROM request_logs WHERE day >= '2026-11-01' GROUP BY app_id;",
    '{"messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 50}',
    "for (const chunk of stream) { if (chunk.choices?.[0]?.delta?.content) process.stdout.write(chunk.choices[0].delta.content); }",
]


def simulator_replies(count: int = 200) -> list[str]:
    return ["".join(generator.reply_tokens(generator.seed_of("bench", i), None)) for i in range(count)]


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if 80 < len(p.strip()) < 1200][:150]


def compare(texts: list[str], model: str) -> tuple[float, float, int]:
    errors, total = [], 0
    for text in texts:
        exact = tokenizer.count(text, model)
        total += exact
        if exact:
            errors.append(abs(count_tokens(text) - exact) / exact)
    return statistics.mean(errors), max(errors), total


def main() -> None:
    corpora = {"simulator replies": simulator_replies(), "README paragraphs": readme_examples(), "Japanese": JAPANESE, "code and JSON": CODE}
    print("| texts | model (encoding) | BPE tokens | rough estimate: mean error | worst |")
    print("|---|---|---:|---:|---:|")
    for model in ("gpt-4o-mini", "gpt-4"):
        for name, texts in corpora.items():
            mean, worst, total = compare(texts, model)
            print(f"| {name} ({len(texts)}) | {model} ({tokenizer.encoding_name(model)}) | {total:,} | {mean:.1%} | {worst:.1%} |")


if __name__ == "__main__":
    main()
