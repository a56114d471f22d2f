"""The HTTP API's request and response shapes, for the OpenAPI document and generated clients.

Request bodies are read and validated by `contracts.job.parse_job` (one validator for every way in);
these models describe the same rules, so a body valid here is valid there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints
from pydantic.json_schema import SkipJsonSchema

from contracts.batches.progress import BATCH_STATUSES
from contracts.catalog import MODELS
from contracts.job import MAX_IMAGES, MAX_METADATA_DEPTH, MAX_PROMPT_CHARS
from contracts.store import CALLBACK_DELIVERED, CALLBACK_FAILED, CALLBACK_GONE, CALLBACK_PENDING

SAFE_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}$"
#: A listing's position: `<created_at in Unix microseconds>-<task id>` (producer/api/tasks.py).
CURSOR_PATTERN = r"^[0-9]{1,16}-[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}$"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_PORT = rf"{_LABEL}(?:\.{_LABEL})*(?::[1-9][0-9]{{0,3}})?"
_PATH_CHAR = r"[^\s?#\x00-\x1f\x7f]"
URL_PATTERN = rf"^https?://{_HOST_PORT}(?:/{_PATH_CHAR}*)?$"
IMAGE_REF_PATTERN = (rf"^(?:(?:s3|oss)://[a-z0-9][a-z0-9.-]{{1,62}}/{_PATH_CHAR}+|https?://{_HOST_PORT}"
                     rf"(?:/{_PATH_CHAR}*)?|upload://[0-9a-f]{{32}})$")
#: A positive amount (CNY), at most 6 decimal places.
MONEY_AMOUNT_PATTERN = r"^(?:[0-9]{0,12}[1-9][0-9]{0,12}(?:\.[0-9]{1,6})?|[0-9]{1,12}\.[0-9]{0,5}[1-9])$"
SOURCE_PATTERN = rf"^(?:s3|oss)://[a-z0-9][a-z0-9.-]{{1,62}}(?:/{_PATH_CHAR}*)?$"
#: At least one character that is not whitespace to Python's str.strip() too (which also strips
#: \x1c-\x1f and \x85, unlike a JSON Schema \S).
NOT_BLANK = r"[^\s\x1c-\x1f\x85]"
#: No NUL in a string (contracts/text.py refuses it, and lone surrogates, in every string of a request).
NO_NUL = r"^[^\x00]*$"
PROMPT_PATTERN = rf"^[^\x00]*{NOT_BLANK[:-1]}\x00][^\x00]*$"
#: `metadata` as the API checks it (contracts/job.py): an object nested at most MAX_METADATA_DEPTH levels,
#: no NUL in any string, keys included. Written out level by level (MetadataValue2..8, then MetadataScalar)
#: rather than as one recursive union, which client generators cannot type.
METADATA_SCHEMA_NAMES = [f"MetadataValue{level}" for level in range(2, MAX_METADATA_DEPTH + 1)]


def metadata_schemas() -> dict[str, dict[str, Any]]:
    """The components `metadata` refers to, one per level below the top object."""
    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    scalars = [{"type": "string", "pattern": NO_NUL}, {"type": "integer"}, {"type": "number"},
               {"type": "boolean"}, {"type": "null"}]
    components: dict[str, dict[str, Any]] = {"MetadataScalar": {"anyOf": scalars}}
    below = "MetadataScalar"
    for name in reversed(METADATA_SCHEMA_NAMES):
        components[name] = {"anyOf": [*scalars, {"type": "array", "items": ref(below)},
                                      {"type": "object", "propertyNames": {"pattern": NO_NUL},
                                       "additionalProperties": ref(below)}]}
        below = name
    return components


METADATA_PROPERTY: dict[str, JsonValue] = {
    "anyOf": [{"type": "object", "propertyNames": {"pattern": NO_NUL},
               "additionalProperties": {"$ref": f"#/components/schemas/{METADATA_SCHEMA_NAMES[0]}"}},
              {"type": "null"}],
    "description": f"echoed in the result (at most 16 KB as JSON, nested at most {MAX_METADATA_DEPTH} levels; "
                   "no NUL in any string)"}
DATETIME_DESCRIPTION = "ISO 8601 / RFC 3339 date-time, e.g. 2026-12-01T00:00:00Z"
Status = Literal["queued", "running", "completed", "failed", "cancelled"]
CALLBACK_STATUSES = (CALLBACK_PENDING, CALLBACK_DELIVERED, CALLBACK_GONE, CALLBACK_FAILED)
ListedStatus = Literal["queued", "running", "completed", "failed", "cancelled", "waiting"]


class _JobFields(BaseModel):
    """What every job request may hold besides its images and conversation (README, "Job request")."""

    model_config = ConfigDict(extra="forbid")
    task_id: str | None = Field(None, pattern=SAFE_ID_PATTERN, description="caller-chosen id; a UUID if absent")
    idempotency_key: str | None = Field(None, pattern=r"^[\x21-\x7e]{1,256}$",
                                        description="a repeat with the same key (same tenant) returns the first task")
    model: str | None = Field(None, description="default: QVQ_MODEL", json_schema_extra={"enum": [*MODELS, None]})
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, pattern=PROMPT_PATTERN)
    high_resolution: bool = False
    tenant: str | None = Field(None, pattern=SAFE_ID_PATTERN,
                               description="who pays: with a tenant key, its own tenant (or absent)")
    callback_url: str | None = Field(None, max_length=2048, pattern=URL_PATTERN)
    metadata: dict[str, Any] | None = None  # documented as METADATA_PROPERTY (producer/api/openapi.py)
    cache: bool = Field(False, description="answer from the result cache when this request was answered before")


_IMAGE_REFS: dict[str, JsonValue] = {"items": {"type": "string", "pattern": IMAGE_REF_PATTERN}}


class NewJobBody(_JobFields):
    """A job with images: a first turn, or a turn of a conversation that brings new images. Over HTTP,
    images are s3://, oss://, https:// or the upload:// references of POST /v1/uploads; never files on
    the server."""

    images: list[str] = Field(..., min_length=1, max_length=MAX_IMAGES, json_schema_extra=_IMAGE_REFS)
    conversation_id: str | None = Field(None, pattern=SAFE_ID_PATTERN,
                                        description="continue this conversation (or start it)")


class FollowUpBody(_JobFields):
    """A later turn of a conversation with no new image: the earlier turns, their images included, are
    sent again as history."""

    conversation_id: str = Field(..., pattern=SAFE_ID_PATTERN, description="the conversation this turn continues")
    images: list[str] = Field(default_factory=list, max_length=0, description="none: absent or empty",
                              json_schema_extra=_IMAGE_REFS)


#: The job body: exactly one of the two shapes, told apart by whether it brings images.
JOB_BODY_SCHEMA = {
    "description": "A job request (README, \"Job request\"): NewJobBody when it brings images, FollowUpBody for "
                   "a conversation's later turn without any.",
    "oneOf": [{"$ref": "#/components/schemas/NewJobBody"}, {"$ref": "#/components/schemas/FollowUpBody"}]}


class ErrorDetail(BaseModel):
    code: str = Field(..., description="a stable error code (README, Errors)")
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class TaskCreated(BaseModel):
    task_id: str
    created: bool = Field(..., description="false when an idempotency key returned an earlier task")


class UploadCreated(BaseModel):
    upload_id: str
    ref: str = Field(..., description="use it in a job's images: upload://<id>")
    format: str
    bytes: int
    expires_at: str


class CancelResult(BaseModel):
    task_id: str
    cancel_requested: bool
    status: Status


class RetryResult(BaseModel):
    task_id: str
    from_seq: int = Field(..., description="GET .../events?from_seq=<it> follows the new run")


MONEY_PATTERN = r"^-?[0-9]+\.[0-9]{6}$"
Money = Annotated[str, StringConstraints(pattern=MONEY_PATTERN)]
Moment = Annotated[str, Field(json_schema_extra={"format": "date-time"}, description=DATETIME_DESCRIPTION)]


class AttemptCost(BaseModel):
    """One billed attempt of the task, from the ledger."""

    attempt: int
    run: int
    outcome: str | None = Field(..., description="completed, failed, cancelled or retried")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = Field(..., description="true when the tokens are our count (the stream had no usage)")
    cost: Money


class Cost(BaseModel):
    """The task's bill: every billed attempt of it (all runs), summed; exact decimal strings, CNY."""

    model_config = ConfigDict(extra="allow")
    input: Money
    output: Money
    total: Money
    currency: Literal["CNY"]
    attempts: list[AttemptCost] = Field(default_factory=list)


class TaskError(BaseModel):
    code: str = Field(..., description="a stable error code (README, Errors)")
    message: str


class ImageSummary(BaseModel):
    """One image as the worker checked and sent it."""

    model_config = ConfigDict(extra="allow")
    ref: str
    format: str | None = Field(None, description="PNG, JPEG, WEBP, ...")
    width: int | None = None
    height: int | None = None
    bytes: int | None = Field(None, description="the object's size as fetched")
    sent_width: int | None = Field(None, description="after downscaling to the model's pixel budget")
    sent_height: int | None = None
    tokens: int | None = Field(None, description="image tokens counted by the vendor's rule")
    sha256: str | None = Field(None, description="of the bytes fetched (absent on rows older than the check)")


class Usage(BaseModel):
    """Tokens of the task: the model's usage chunk (or our count, `estimated`), and with `billed` every
    billed attempt summed, as the bill counts them."""

    model_config = ConfigDict(extra="allow")
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    estimated: bool | None = None
    billed: dict[str, Any] | None = Field(None, description="every billed attempt's tokens, summed")


class Timings(BaseModel):
    model_config = ConfigDict(extra="allow")
    queue_s: float | None = Field(None, description="submit to the run's start")
    first_reasoning_s: float | None = Field(None, description="the run's start to its first reasoning text")
    first_answer_s: float | None = None
    total_s: float | None = Field(None, description="the run's start to its end")


class CallbackTry(BaseModel):
    model_config = ConfigDict(extra="allow")
    at: Moment
    outcome: str = Field(..., description="delivered, retry, gone or refused")
    status_code: int | None
    error: str | None


class CallbackDelivery(BaseModel):
    """The delivery of the terminal event to `callback_url` (its query is never shown)."""

    event_id: str
    run: int
    url: str
    status: str = Field(..., json_schema_extra={"enum": list(CALLBACK_STATUSES)})
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: Moment | None
    created_at: Moment
    delivered_at: Moment | None
    attempt_log: list[CallbackTry]


class Waiting(BaseModel):
    model_config = ConfigDict(extra="allow")
    reason: str | None = Field(None, description="model_quota, tenant_concurrency, tenant_rate")
    wait_s: float | None = None
    since: float | None = Field(None, description="Unix time the wait began")


class TaskRecord(BaseModel):
    """A task (GET /v1/tasks/{id}): its request, its text, its images, its bill and how its runs went."""

    model_config = ConfigDict(extra="allow")
    task_id: str
    status: Status
    model: str
    tenant: str | None
    conversation_id: str | None = None
    idempotency_key: str | None = None
    request: dict[str, Any] = Field(..., description="the job request as accepted (README, Job request)")
    reasoning: str | None = Field(None, description="the model's thinking, whole")
    answer: str | None = None
    error: TaskError | None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int
    retry_base: int = 0
    run: int = Field(0, description="0 for the first run; each retry starts the next")
    last_seq: int = Field(0, description="the highest event seq known: follow from here")
    images: list[ImageSummary] | None = None
    usage: Usage | None = None
    cost: Cost | None = None
    timings: Timings | None = None
    metadata: dict[str, Any]
    created_at: Moment
    started_at: Moment | None = None
    finished_at: Moment | None = None
    callback: CallbackDelivery | None = None
    waiting: Waiting | None = Field(None, description="while flow control holds the task back")
    batch_id: str | None = Field(None, description="the batch this task is an item of")
    cached: bool = Field(False, description="the answer came from the result cache (billed 0)")
    cached_from: str | None = Field(None, description="the task that paid for a cached answer")


class TaskSummary(BaseModel):
    task_id: str
    status: Status
    model: str
    tenant: str | None
    conversation_id: str | None
    attempts: int
    error: TaskError | None
    cost: Cost | None
    created_at: Moment
    started_at: Moment | None
    finished_at: Moment | None


class TaskList(BaseModel):
    tasks: list[TaskSummary]
    next_cursor: str | None = Field(..., description="pass as ?cursor= for the next page; null at the end")


class Conversation(BaseModel):
    conversation_id: str


class Limits(BaseModel):
    limiter: bool = Field(..., description="whether the model limiter is on (QVQ_FLOW_CONTROL)")
    families: list[dict[str, Any]] = Field(..., description="per model family: requests and tokens used this "
                                                             "second and minute against the limits, waiters")


class UsageRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    calls: int = Field(..., description="billed attempts, failed and cancelled ones included")
    estimated_calls: int = Field(..., description="attempts whose usage is our count (the stream had none)")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_cny: str = Field(..., description="exact decimal, CNY")


class UsageReport(BaseModel):
    rows: list[UsageRow]
    total: UsageRow


class BatchRequestBody(BaseModel):
    """A batch (README, Batches): one question over every object under a prefix, or over a list of refs."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["source"], "not": {"required": ["items"]}},
        {"required": ["items"], "not": {"anyOf": [{"required": ["suffix"]}, {"required": ["source"]}]}}]})
    batch_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,100}$")] | SkipJsonSchema[None] = Field(
        None, description="caller-chosen: submitting it again adds only new objects")
    source: Annotated[str, StringConstraints(pattern=SOURCE_PATTERN)] | SkipJsonSchema[None] = Field(
        None, description="s3://bucket/prefix")
    suffix: Annotated[str, StringConstraints(max_length=64, pattern=NO_NUL)] | SkipJsonSchema[None] = Field(
        None, description="keep keys ending with it, e.g. .jpg")
    items: Annotated[list[Annotated[str, StringConstraints(pattern=IMAGE_REF_PATTERN)]],
                              Field(min_length=1)] | SkipJsonSchema[None] = None
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, pattern=PROMPT_PATTERN)
    model: str | None = Field(None, description="default: QVQ_MODEL", json_schema_extra={"enum": [*MODELS, None]})
    high_resolution: bool = False
    tenant: str | None = Field(None, pattern=SAFE_ID_PATTERN)
    callback_url: str | None = Field(None, max_length=2048, pattern=URL_PATTERN,
                                     description="POSTed batch.completed, once per round")
    max_cost_cny: Annotated[str, StringConstraints(pattern=MONEY_AMOUNT_PATTERN)] | SkipJsonSchema[None] = Field(
        None, description="refused when the estimate's maximum is over it; no item starts once the batch spent it")
    cache: bool = False
    dry_run: bool = Field(False, description="count and estimate only: nothing is queued or called")


class BatchEstimate(BaseModel):
    image_tokens: int
    cost_cny_min: Money
    cost_cny_max: Money
    currency: str = "CNY"
    unread: int = Field(0, description="items whose size could not be read: counted from the smallest to "
                                       "the largest image")


class BatchCreated(BaseModel):
    batch_id: str
    items: int
    created: int = Field(..., description="items added by this submit (0 when all were there)")
    estimate: BatchEstimate | None


class BatchDryRun(BaseModel):
    items: int
    estimate: BatchEstimate
    dry_run: bool = True


class Batch(BaseModel):
    """A batch now (GET /v1/batches/{id}): its request, status and tally."""

    model_config = ConfigDict(extra="allow")
    batch_id: str
    status: str = Field(..., json_schema_extra={"enum": list(BATCH_STATUSES)})
    items: int
    counts: dict[str, int] = Field(..., description="items by status")
    done: int = Field(..., description="items that ended")
    tokens: int
    cost: Money
    rate: float = Field(..., description="items ended per second, since the batch began")
    eta_s: float | None
    round: int
    estimate: BatchEstimate | None = None


class BatchCancelled(BaseModel):
    batch_id: str
    cancelled: int = Field(..., description="queued items cancelled")
    stopping: int = Field(..., description="running items asked to stop")


class BatchRetried(BaseModel):
    batch_id: str
    retried: int = Field(..., description="failed items queued again")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an operation can answer."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


_DESCRIPTIONS = {
    400: "the body or a header is malformed (request.invalid)",
    401: "no key, or an unknown one (auth.required, auth.invalid)",
    403: "the key may not do this (auth.forbidden)",
    404: "no such task for this key (task.not_found), conversation.not_found, or image.not_found (an upload)",
    409: "the task id is taken, or the task is not in a state that allows this (request.invalid)",
    410: "the task's events have expired (events.expired)",
    413: "the body is over its limit (request.too_large, image.too_large)",
    415: "wrong Content-Type (request.unsupported_media_type)",
    422: "a field is invalid (request.invalid, model.unknown, image.unsupported_format)",
    503: "the queue or the database is unavailable; nothing was queued (unavailable)",
}


def event_stream(types: Iterable[str]) -> dict[str, Any]:
    """An SSE response's content: each event as OpenAPI 3.2's `itemSchema` describes it (`id: <seq>`,
    `event: <type>`, `data: <the event as JSON>`; README, "Events"). No `schema` for the stream as a
    whole: a generated client hands the stream back as it came, to be read as Server-Sent Events."""
    return {"text/event-stream": {"itemSchema": {
        "type": "object", "required": ["data"], "properties": {
            "id": {"type": "string", "description": "the event's seq"},
            "event": {"type": "string", "enum": list(types)},
            "data": {"type": "string", "description": "the event as JSON"}}}}}
