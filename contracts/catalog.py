"""The QVQ models we accept, their limits and prices (qvq-api.md, China region, CNY per 1,000 tokens)."""

from __future__ import annotations

from collections.abc import Callable
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
    """Cost in CNY as JSON carries it (exact decimal strings): input tokens x input price + output tokens
    x output price, per 1,000 tokens."""
    exact = cost_decimal(model, prompt_tokens, completion_tokens)
    return {"input": money_text(exact["input"]), "output": money_text(exact["output"]),
            "total": money_text(exact["total"]), "currency": "CNY"}


#: The amounts of a cost object (the task's, and each attempt's `cost`).
MONEY_FIELDS = ("input", "output", "total")


def money_text(amount: Decimal | float | str) -> str:
    """An amount as every JSON that leaves the process writes it: an exact decimal string, 6 places."""
    return str(Decimal(str(amount)).quantize(MONEY_PLACES))


def cost_as_decimals(cost: dict[str, Any] | None) -> dict[str, Any] | None:
    """A cost object for Python: its amounts (and each attempt's) as Decimal (rows written before money
    was text hold floats: read exactly as they print)."""
    return _map_amounts(cost, lambda value: Decimal(str(value)))


def cost_as_text(cost: dict[str, Any] | None) -> dict[str, Any] | None:
    """A cost object for JSON: its amounts (and each attempt's) as exact decimal strings."""
    return _map_amounts(cost, money_text)


def _map_amounts(cost: dict[str, Any] | None, convert: Callable[[Any], Any]) -> dict[str, Any] | None:
    if not cost:
        return cost
    out = {name: convert(value) if name in MONEY_FIELDS and value is not None else value
           for name, value in cost.items()}
    if isinstance(cost.get("attempts"), list):
        out["attempts"] = [{**item, "cost": convert(item["cost"])} if isinstance(item, dict) and "cost" in item
                           else item for item in cost["attempts"]]
    return out


def cost_decimal(model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Decimal]:
    """The exact cost in CNY (Decimal, 6 places), with the prices used: for budgets and the ledger."""
    info = MODELS[model]
    input_cost = (Decimal(prompt_tokens) * info.input_price / 1000).quantize(MONEY_PLACES)
    output_cost = (Decimal(completion_tokens) * info.output_price / 1000).quantize(MONEY_PLACES)
    return {"input": input_cost, "output": output_cost, "total": input_cost + output_cost,
            "input_price": info.input_price, "output_price": info.output_price}


def worst_case_cost(model: str, input_tokens: int) -> Decimal:
    """The most a call can cost: its counted input and the model's maximum output (thinking + answer)."""
    info = MODELS[model]
    return cost_decimal(model, input_tokens, info.max_thinking + info.max_answer)["total"]
