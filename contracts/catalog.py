"""The QVQ models we accept, their limits and prices (qvq-api.md, China region, CNY per 1,000 tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    input_price: Decimal  # CNY per 1,000 input tokens
    output_price: Decimal  # CNY per 1,000 output tokens (thinking is billed as output)
    context: int = 131_072
    max_input: int = 106_496
    max_thinking: int = 16_384
    max_answer: int = 8_192


_MAX = ("qvq-max", Decimal("0.008"), Decimal("0.032"))
_PLUS = ("qvq-plus", Decimal("0.002"), Decimal("0.005"))

MODELS: dict[str, ModelInfo] = {
    name: ModelInfo(name, *family)
    for family, names in (
        (_MAX, ("qvq-max", "qvq-max-latest", "qvq-max-2025-05-15", "qvq-max-2025-03-25")),
        (_PLUS, ("qvq-plus", "qvq-plus-latest", "qvq-plus-2025-05-15")),
    )
    for name in names
}

REFUSED_MODELS = {
    "qvq-72b-preview": "qvq-72b-preview is not a QVQ reasoning model of this API; "
    "use the plain vision-understanding API for it",
}

MONEY_PLACES = Decimal("0.000001")


def model_info(name: str) -> ModelInfo:
    return MODELS[name]


def cost(model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Cost in CNY: input tokens x input price + output tokens x output price, per 1,000 tokens."""
    info = MODELS[model]
    input_cost = (Decimal(prompt_tokens) * info.input_price / 1000).quantize(MONEY_PLACES)
    output_cost = (Decimal(completion_tokens) * info.output_price / 1000).quantize(MONEY_PLACES)
    return {
        "input": float(input_cost),
        "output": float(output_cost),
        "total": float(input_cost + output_cost),
        "currency": "CNY",
    }
