"""What the gateway serves: one table of operations.

Each entry says everything the stages need to know about one kind of request: its routes (Azure
style and v1 style), what its body must hold, whether it streams and may be cached, every field
the model reads (the input guard and the quota estimate walk these), every field the model writes
(the output guard acts on these, in whole answers and in stream events), how the prompt is sized
and the answer's length bounded, where the app's system prompt goes, where credentials may sit in
a request (never stored), and which stages apply. Stages read the entry; none branches on which
operation it is. Adding an operation is one entry here plus its tests (docs/architecture.md
shows one being added).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from . import errors
from .field_paths import FieldSet
from .token_estimate import count_tokens, image_parts, message_overhead
from .usage import audio_units, image_units, speech_units


class Style(str, enum.Enum):
    AZURE = "azure"  # /openai/deployments/{deployment}/... ?api-version=...
    V1 = "v1"  # /openai/v1/... with the deployment in the body's `model`


@dataclass(frozen=True)
class RouteSpec:
    function_name: str  # the Azure Functions function name
    template: str  # Azure Functions route template ({name} segments); host.json's route prefix is ""
    style: Style
    methods: tuple[str, ...] = ("POST",)


# Stages that an operation may ask for (the gateway builds each operation's pipeline from these).
AUTHENTICATE, VALIDATE, ACCESS = "authenticate", "validate", "access"
INPUT_GUARD, SYSTEM_PROMPT, STREAM_USAGE = "input_guard", "system_prompt", "stream_usage"
CACHE, QUOTA, OUTPUT_GUARD, REQUEST_LOG = "cache", "quota", "output_guard", "request_log"
OWNERSHIP, BATCH_INPUT, DEFERRED = "ownership", "batch_input", "deferred"
CONTENT_SAFETY, PERSONAL_DATA = "content_safety", "personal_data"
MODEL_STAGES = frozenset({AUTHENTICATE, VALIDATE, ACCESS, INPUT_GUARD, PERSONAL_DATA, CONTENT_SAFETY, SYSTEM_PROMPT, STREAM_USAGE,
                          CACHE, QUOTA, OUTPUT_GUARD, REQUEST_LOG})

# Fields that count something the quota estimate multiplies: whole numbers in Azure's ranges.
_MAX_INT32 = 2**31 - 1

# Where Azure's "On Your Data" and other extensions carry credentials to their data sources.
# Every field named like a secret below these roots is masked wherever a request is stored.
DATA_SOURCE_ROOTS = ("data_sources", "dataSources")


def _prompt_estimate_messages(body: dict[str, Any], reads: FieldSet) -> int:
    messages = body.get("messages") or []
    return count_tokens("\n".join(reads.texts(body))) + message_overhead(len(messages)) + image_parts(messages)


def _prompt_estimate_text(body: dict[str, Any], reads: FieldSet) -> int:
    return count_tokens("\n".join(reads.texts(body))) + image_parts(body.get("input"))


def _prompt_estimate_embeddings(body: dict[str, Any], reads: FieldSet) -> int:
    value = body.get("input")
    if isinstance(value, list) and value and isinstance(value[0], int):
        return len(value)  # already token ids
    if isinstance(value, list) and value and isinstance(value[0], list):
        return sum(len(v) for v in value)
    return count_tokens("\n".join(reads.texts(body)))


def whole_number(value: Any) -> int | None:
    """`value` as a whole number, or None. JSON does not tell 8 from 8.0 (JSON Schema calls both an
    integer), so an integral float counts as its integer: the quota estimate must count `n: 8.0`
    as 8 answers, whatever Azure then says of the decimal point."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_int(value: Any) -> bool:
    return whole_number(value) is not None


def _check_embedding_input(body: dict[str, Any]) -> None:
    items = body["input"]
    if isinstance(items, list) and not (all(isinstance(i, str) for i in items) or all(_is_int(i) for i in items)
                                        or all(isinstance(i, list) and all(_is_int(t) for t in i) for i in items)):
        raise errors.invalid_request("'input' must be a string, an array of strings, an array of token ids, or an array of token id arrays.", "input")


def _check_instructions(body: dict[str, Any]) -> None:
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise errors.invalid_request("'instructions' must be a string.", "instructions")


def _check_messages(body: dict[str, Any]) -> None:
    if not body["messages"]:
        raise errors.invalid_request("'messages' must not be empty.", "messages")


@dataclass(frozen=True, eq=False)  # compared by identity: each entry is one operation
class Operation:
    name: str  # as logged: chat.completions, responses, …
    routes: tuple[RouteSpec, ...]
    stages: frozenset[str]
    body: str = "json"  # json, multipart (uploads: never re-encoded), or none (GET, DELETE, bodiless POST)
    required: tuple[tuple[str, tuple[type, ...]], ...] = ()
    check_body: Callable[[dict[str, Any]], None] | None = None  # more than required fields and types
    content_fields: tuple[str, ...] = ()  # logged as the prompt (under the app's content-logging level)
    reads: FieldSet = field(default_factory=FieldSet)  # every field the model reads, in reading order
    writes: FieldSet = field(default_factory=FieldSet)  # every field the model writes, whole answer
    stream_shape: str | None = None  # chat_chunks, text_chunks or response_events (None: never streams)
    stream_writes: FieldSet = field(default_factory=FieldSet)  # chunk streams: the fields it writes inside one event
    stream_events: dict[str, str] = field(default_factory=dict)  # typed-event streams: event type → the field carrying the text
    stream_usage_option: bool = False  # accepts stream_options.include_usage
    counts: tuple[str, ...] = ()  # whole-number fields that size the answer (validated)
    completion_limits: tuple[str, ...] = ()  # fields bounding each answer's tokens, first set wins
    choices: tuple[str, ...] = ()  # fields multiplying the answers generated (n, best_of)
    prompt_estimate: Callable[[dict[str, Any], FieldSet], int] | None = None
    always_deterministic: bool = False  # the same request gives the same answer whatever its sampling fields
    system_prompt: str | None = None  # where the app's prompt goes: messages, instructions or prompt
    credential_roots: tuple[str, ...] = ()  # request fields whose secret-named members are never stored
    answered_by_gateway: str | None = None  # the gateway answers itself, no upstream call: "models" or "owned_list"
    answer_is_vectors: bool = False  # the answer's `data` holds vectors: logged as their count
    message_framing: bool = False  # the prompt is chat messages: the model adds tokens around each
    binary_answer: bool = False  # the answer is bytes (audio), relayed as they arrive
    units: Callable[[Any, Any], dict[str, float]] | None = None  # what is priced besides tokens: (request body, answer or None) → units
    creates: str | None = None  # the kind of object its answer creates upstream, owned by the calling app (the answer's `id`)
    owned: tuple[str, str] | None = None  # (kind, path parameter): an operation about an object the app must own
    refers_to: tuple[tuple[FieldSet, str], ...] = ()  # (body fields, kind): objects a request names, which must be the app's
    lists: str | None = None  # the kind of owned object it lists (answered from the ownership records)
    needs_deployment: bool = True  # names a deployment (path or `model`); files belong to the resource
    # Answer statuses meaning the work goes on upstream (a batch, a background response): the
    # request's reservation is kept with the object's record and settled, with log records, when
    # the work ends (noticed when the app polls, and by the reconciling timer).
    pending_statuses: frozenset[str] = frozenset()
    batch_lines: bool = False  # a batch is many requests: each line's operation, by the line's `url`
    # Where the user's own words and the tool results are, for Prompt Shields: "messages" (by
    # role), "responses_input" (user items and function call outputs) or "prompt" (all user's).
    shielded: str | None = None

    @property
    def streams(self) -> bool:
        return self.stream_shape is not None

    def applies(self, stage: str) -> bool:
        return stage in self.stages

    def still_running(self, answer: Any) -> bool:
        """Whether an answer says its work goes on upstream (a batch, a background response)."""
        return isinstance(answer, dict) and answer.get("status") in self.pending_statuses


_CHAT_READS = FieldSet(
    # The model reads the tool and function definitions and the answer's schema before the messages.
    "tools[].function.name", "tools[].function.description", "tools[].function.parameters.**",
    "functions[].name", "functions[].description", "functions[].parameters.**",
    "response_format.json_schema.**",
    "messages[].name",
    "messages[].content", "messages[].content[].text", "messages[].content[].refusal",
    "messages[].refusal",
    "messages[].tool_calls[].function.name", "messages[].tool_calls[].function.arguments",
    "messages[].function_call.name", "messages[].function_call.arguments",
    "messages[].audio.transcript",
    "prediction.content", "prediction.content[].text",
)
_CHAT_WRITES = FieldSet(
    "choices[].message.content", "choices[].message.refusal",
    "choices[].message.tool_calls[].function.name", "choices[].message.tool_calls[].function.arguments",
    "choices[].message.function_call.name", "choices[].message.function_call.arguments",
    "choices[].message.audio.transcript",
)
_CHAT_STREAM_WRITES = FieldSet(
    "choices[].delta.content", "choices[].delta.refusal",
    "choices[].delta.tool_calls[].function.name", "choices[].delta.tool_calls[].function.arguments",
    "choices[].delta.function_call.name", "choices[].delta.function_call.arguments",
    "choices[].delta.audio.transcript",
)

CHAT = Operation(
    name="chat.completions",
    routes=(RouteSpec("azure_chat_completions", "openai/deployments/{deployment}/chat/completions", Style.AZURE),
            RouteSpec("v1_chat_completions", "openai/v1/chat/completions", Style.V1)),
    stages=MODEL_STAGES | {OWNERSHIP},
    required=(("messages", (list,)),),
    check_body=_check_messages,
    content_fields=("messages", "prediction"),
    reads=_CHAT_READS,
    writes=_CHAT_WRITES,
    stream_shape="chat_chunks",
    stream_writes=_CHAT_STREAM_WRITES,
    stream_usage_option=True,
    counts=("n", "max_tokens", "max_completion_tokens"),
    completion_limits=("max_completion_tokens", "max_tokens"),
    choices=("n",),
    prompt_estimate=_prompt_estimate_messages,
    message_framing=True,
    system_prompt="messages",
    shielded="messages",
    credential_roots=DATA_SOURCE_ROOTS,
    refers_to=((FieldSet("messages[].content[].file.file_id"), "file"),),
)

COMPLETIONS = Operation(
    name="completions",
    routes=(RouteSpec("azure_completions", "openai/deployments/{deployment}/completions", Style.AZURE),),
    stages=MODEL_STAGES,
    required=(("prompt", (str, list)),),
    content_fields=("prompt", "suffix"),
    reads=FieldSet("prompt", "prompt[]", "suffix"),
    writes=FieldSet("choices[].text"),
    stream_shape="text_chunks",
    stream_writes=FieldSet("choices[].text"),
    stream_usage_option=True,
    counts=("n", "best_of", "max_tokens"),
    completion_limits=("max_tokens",),
    choices=("n", "best_of"),
    prompt_estimate=_prompt_estimate_text,
    system_prompt="prompt",
    shielded="prompt",
)

EMBEDDINGS = Operation(
    name="embeddings",
    routes=(RouteSpec("azure_embeddings", "openai/deployments/{deployment}/embeddings", Style.AZURE),
            RouteSpec("v1_embeddings", "openai/v1/embeddings", Style.V1)),
    stages=MODEL_STAGES - {SYSTEM_PROMPT, STREAM_USAGE, OUTPUT_GUARD},
    required=(("input", (str, list)),),
    check_body=_check_embedding_input,
    content_fields=("input",),
    reads=FieldSet("input", "input[]"),
    prompt_estimate=_prompt_estimate_embeddings,
    always_deterministic=True,
    answer_is_vectors=True,
)

_RESPONSES_READS = FieldSet(
    "instructions",
    "tools[].name", "tools[].description", "tools[].parameters.**",
    "tools[].function.name", "tools[].function.description", "tools[].function.parameters.**",
    "text.format.name", "text.format.description", "text.format.schema.**",
    "prompt.variables.**",
    "input",
    "input[].name", "input[].content", "input[].content[].text", "input[].content[].refusal",
    "input[].arguments", "input[].input", "input[].output", "input[].output[].text",
    "input[].summary[].text",
    "input[].text",  # an input_text item given at the top level
)
_RESPONSES_WRITES = FieldSet(
    "output[].content[].text", "output[].content[].refusal",
    "output[].name", "output[].arguments", "output[].input",
    "output[].summary[].text",
)

RESPONSES = Operation(
    name="responses",
    routes=(RouteSpec("azure_responses", "openai/responses", Style.AZURE),
            RouteSpec("v1_responses", "openai/v1/responses", Style.V1)),
    stages=(MODEL_STAGES - {STREAM_USAGE}) | {OWNERSHIP},
    creates="response",
    refers_to=((FieldSet("previous_response_id"), "response"), (FieldSet("input[].content[].file_id", "input[].file_id"), "file")),
    shielded="responses_input",
    required=(("input", (str, list)),),
    check_body=_check_instructions,
    content_fields=("input", "instructions", "prompt"),
    reads=_RESPONSES_READS,
    writes=_RESPONSES_WRITES,
    stream_shape="response_events",
    # A piece in `.delta` events (under `delta`), the whole field at `.done`.
    stream_events={
        "response.output_text.delta": "text", "response.output_text.done": "text",
        "response.refusal.delta": "refusal", "response.refusal.done": "refusal",
        "response.function_call_arguments.delta": "arguments", "response.function_call_arguments.done": "arguments",
        "response.custom_tool_call_input.delta": "input", "response.custom_tool_call_input.done": "input",
        "response.reasoning_summary_text.delta": "text", "response.reasoning_summary_text.done": "text",
    },
    counts=("max_output_tokens",),
    completion_limits=("max_output_tokens",),
    prompt_estimate=_prompt_estimate_text,
    system_prompt="instructions",
    credential_roots=DATA_SOURCE_ROOTS,
    pending_statuses=frozenset({"queued", "in_progress"}),  # `background: true`
)

def _check_upload(body: dict[str, Any]) -> None:
    upload = body.get("file")
    if not isinstance(upload, dict) or not upload.get("bytes"):
        raise errors.invalid_request("Missing required parameter: 'file' (the audio, as a multipart file upload).", "file")


def _check_image_upload(body: dict[str, Any]) -> None:
    images = body.get("image") if "image" in body else body.get("image[]")
    images = images if isinstance(images, list) else [images]
    if not all(isinstance(i, dict) and i.get("bytes") for i in images):
        raise errors.invalid_request("Missing required parameter: 'image' (a multipart file upload).", "image")
    if not isinstance(body.get("prompt"), str):
        raise errors.invalid_request("Missing required parameter: 'prompt'.", "prompt")


_TRANSCRIPT_WRITES = FieldSet("text", "segments[].text", "words[].word")
_AUDIO_STAGES = MODEL_STAGES - {SYSTEM_PROMPT, STREAM_USAGE, CACHE}  # an upload's bytes are not in a cache key

AUDIO_TRANSCRIPTIONS = Operation(
    name="audio.transcriptions",
    routes=(RouteSpec("azure_audio_transcriptions", "openai/deployments/{deployment}/audio/transcriptions", Style.AZURE),
            RouteSpec("v1_audio_transcriptions", "openai/v1/audio/transcriptions", Style.V1)),
    stages=_AUDIO_STAGES,
    body="multipart",
    check_body=_check_upload,
    content_fields=("prompt",),
    reads=FieldSet("prompt"),
    writes=_TRANSCRIPT_WRITES,
    stream_shape="response_events",
    # gpt-4o-transcribe class models stream a transcript's pieces, then the whole at `.done`.
    stream_events={"transcript.text.delta": "text", "transcript.text.done": "text"},
    prompt_estimate=_prompt_estimate_text,
    units=audio_units,
)

AUDIO_TRANSLATIONS = Operation(
    name="audio.translations",
    routes=(RouteSpec("azure_audio_translations", "openai/deployments/{deployment}/audio/translations", Style.AZURE),
            RouteSpec("v1_audio_translations", "openai/v1/audio/translations", Style.V1)),
    stages=_AUDIO_STAGES,
    body="multipart",
    check_body=_check_upload,
    content_fields=("prompt",),
    reads=FieldSet("prompt"),
    writes=_TRANSCRIPT_WRITES,
    prompt_estimate=_prompt_estimate_text,
    units=audio_units,
)

AUDIO_SPEECH = Operation(
    name="audio.speech",
    routes=(RouteSpec("azure_audio_speech", "openai/deployments/{deployment}/audio/speech", Style.AZURE),
            RouteSpec("v1_audio_speech", "openai/v1/audio/speech", Style.V1)),
    stages=MODEL_STAGES - {SYSTEM_PROMPT, STREAM_USAGE, CACHE, OUTPUT_GUARD},  # it writes audio, no text
    required=(("input", (str,)),),
    content_fields=("input", "instructions"),
    reads=FieldSet("instructions", "input"),
    prompt_estimate=_prompt_estimate_text,
    binary_answer=True,
    units=speech_units,
)

_IMAGE_WRITES = FieldSet("data[].revised_prompt")

IMAGES_GENERATIONS = Operation(
    name="images.generations",
    routes=(RouteSpec("azure_images_generations", "openai/deployments/{deployment}/images/generations", Style.AZURE),
            RouteSpec("v1_images_generations", "openai/v1/images/generations", Style.V1)),
    stages=MODEL_STAGES - {SYSTEM_PROMPT, STREAM_USAGE},
    required=(("prompt", (str,)),),
    content_fields=("prompt",),
    reads=FieldSet("prompt"),
    writes=_IMAGE_WRITES,
    counts=("n",),
    choices=("n",),
    prompt_estimate=_prompt_estimate_text,
    units=image_units,
)

IMAGES_EDITS = Operation(
    name="images.edits",
    routes=(RouteSpec("azure_images_edits", "openai/deployments/{deployment}/images/edits", Style.AZURE),
            RouteSpec("v1_images_edits", "openai/v1/images/edits", Style.V1)),
    stages=_AUDIO_STAGES,
    body="multipart",
    check_body=_check_image_upload,
    content_fields=("prompt",),
    reads=FieldSet("prompt"),
    writes=_IMAGE_WRITES,
    choices=("n",),
    prompt_estimate=_prompt_estimate_text,
    units=image_units,
)

# Stored responses: what an app created, read, deleted or cancelled by its owner only, at the
# backend that holds it. Not model calls: no quota, no cache; the output guard still reads what
# the model wrote.
_STORED_STAGES = frozenset({AUTHENTICATE, VALIDATE, ACCESS, OWNERSHIP, DEFERRED, OUTPUT_GUARD, REQUEST_LOG})

STORED_RESPONSE = Operation(
    name="responses.stored",
    routes=(RouteSpec("azure_stored_response", "openai/responses/{response_id}", Style.AZURE, ("GET", "DELETE")),
            RouteSpec("v1_stored_response", "openai/v1/responses/{response_id}", Style.V1, ("GET", "DELETE"))),
    stages=_STORED_STAGES,
    body="none",
    writes=_RESPONSES_WRITES,
    owned=("response", "response_id"),
    pending_statuses=RESPONSES.pending_statuses,
)

STORED_RESPONSE_INPUT_ITEMS = Operation(
    name="responses.input_items",
    routes=(RouteSpec("azure_stored_response_input_items", "openai/responses/{response_id}/input_items", Style.AZURE, ("GET",)),
            RouteSpec("v1_stored_response_input_items", "openai/v1/responses/{response_id}/input_items", Style.V1, ("GET",))),
    stages=_STORED_STAGES - {OUTPUT_GUARD, DEFERRED},  # the client's own input
    body="none",
    owned=("response", "response_id"),
)

STORED_RESPONSE_CANCEL = Operation(
    name="responses.cancel",
    routes=(RouteSpec("azure_stored_response_cancel", "openai/responses/{response_id}/cancel", Style.AZURE),
            RouteSpec("v1_stored_response_cancel", "openai/v1/responses/{response_id}/cancel", Style.V1)),
    stages=_STORED_STAGES,
    body="none",
    writes=_RESPONSES_WRITES,
    owned=("response", "response_id"),
    pending_statuses=RESPONSES.pending_statuses,
)

def _check_file_upload(body: dict[str, Any]) -> None:
    upload = body.get("file")
    if not isinstance(upload, dict) or not upload.get("bytes"):
        raise errors.invalid_request("Missing required parameter: 'file' (a multipart file upload).", "file")
    if not isinstance(body.get("purpose"), str):
        raise errors.invalid_request("Missing required parameter: 'purpose'.", "purpose")


# Files an app uploads belong to it: listed, read and deleted by it alone, at the backend holding them.
_FILE_STAGES = frozenset({AUTHENTICATE, VALIDATE, ACCESS, OWNERSHIP, REQUEST_LOG})

FILES_UPLOAD = Operation(
    name="files.upload",
    routes=(RouteSpec("azure_files", "openai/files", Style.AZURE, ("POST",)),
            RouteSpec("v1_files", "openai/v1/files", Style.V1, ("POST",))),
    stages=_FILE_STAGES | {BATCH_INPUT},  # a batch input file: every line checked, the file rewritten
    body="multipart",
    check_body=_check_file_upload,
    creates="file",
    needs_deployment=False,
)

FILES_LIST = Operation(
    name="files.list",
    routes=(RouteSpec("azure_files", "openai/files", Style.AZURE, ("GET",)),
            RouteSpec("v1_files", "openai/v1/files", Style.V1, ("GET",))),
    stages=_FILE_STAGES - {OWNERSHIP},
    body="none",
    answered_by_gateway="owned_list",
    lists="file",
)

FILE = Operation(
    name="files.retrieve",
    routes=(RouteSpec("azure_file", "openai/files/{file_id}", Style.AZURE, ("GET", "DELETE")),
            RouteSpec("v1_file", "openai/v1/files/{file_id}", Style.V1, ("GET", "DELETE"))),
    stages=_FILE_STAGES,
    body="none",
    owned=("file", "file_id"),
)

FILE_CONTENT = Operation(
    name="files.content",
    routes=(RouteSpec("azure_file_content", "openai/files/{file_id}/content", Style.AZURE, ("GET",)),
            RouteSpec("v1_file_content", "openai/v1/files/{file_id}/content", Style.V1, ("GET",))),
    stages=_FILE_STAGES | {OUTPUT_GUARD},  # a batch's output file holds what the model wrote
    body="none",
    owned=("file", "file_id"),
    binary_answer=True,
)

# Batches: many requests in one input file, run by Azure OpenAI within a day at the batch price.
# Every line was checked as its own request when the file was uploaded (jobs/batches.py); creating
# the batch reserves what its lines may cost; its end settles that, one log record per line.
BATCH_ENDPOINTS = {"/chat/completions": "chat.completions", "/v1/chat/completions": "chat.completions",
                   "/embeddings": "embeddings", "/v1/embeddings": "embeddings",
                   "/responses": "responses", "/v1/responses": "responses"}
_BATCH_PENDING = frozenset({"validating", "in_progress", "finalizing", "cancelling"})


def _check_batch(body: dict[str, Any]) -> None:
    if body["endpoint"] not in BATCH_ENDPOINTS:
        raise errors.invalid_request(f"'endpoint' must be one of {', '.join(sorted(BATCH_ENDPOINTS))}.", "endpoint")


BATCHES_CREATE = Operation(
    name="batches.create",
    routes=(RouteSpec("azure_batches", "openai/batches", Style.AZURE, ("POST",)),
            RouteSpec("v1_batches", "openai/v1/batches", Style.V1, ("POST",))),
    stages=_FILE_STAGES | {BATCH_INPUT, QUOTA},
    required=(("input_file_id", (str,)), ("endpoint", (str,)), ("completion_window", (str,))),
    check_body=_check_batch,
    creates="batch",
    refers_to=((FieldSet("input_file_id"), "file"),),
    needs_deployment=False,
    pending_statuses=_BATCH_PENDING,
    batch_lines=True,
)

BATCHES_LIST = Operation(
    name="batches.list",
    routes=(RouteSpec("azure_batches", "openai/batches", Style.AZURE, ("GET",)),
            RouteSpec("v1_batches", "openai/v1/batches", Style.V1, ("GET",))),
    stages=_FILE_STAGES - {OWNERSHIP},
    body="none",
    answered_by_gateway="owned_list",
    lists="batch",
    needs_deployment=False,
)

BATCH = Operation(
    name="batches.retrieve",
    routes=(RouteSpec("azure_batch", "openai/batches/{batch_id}", Style.AZURE, ("GET",)),
            RouteSpec("v1_batch", "openai/v1/batches/{batch_id}", Style.V1, ("GET",))),
    stages=_FILE_STAGES | {DEFERRED},
    body="none",
    owned=("batch", "batch_id"),
    pending_statuses=_BATCH_PENDING,
    needs_deployment=False,
)

BATCH_CANCEL = Operation(
    name="batches.cancel",
    routes=(RouteSpec("azure_batch_cancel", "openai/batches/{batch_id}/cancel", Style.AZURE),
            RouteSpec("v1_batch_cancel", "openai/v1/batches/{batch_id}/cancel", Style.V1)),
    stages=_FILE_STAGES | {DEFERRED},
    body="none",
    owned=("batch", "batch_id"),
    pending_statuses=_BATCH_PENDING,
    needs_deployment=False,
)

MODELS = Operation(
    name="models.list",
    routes=(RouteSpec("azure_models", "openai/models", Style.AZURE, ("GET",)),
            RouteSpec("v1_models", "openai/v1/models", Style.V1, ("GET",))),
    stages=frozenset({AUTHENTICATE, VALIDATE, ACCESS, REQUEST_LOG}),
    body="none",
    answered_by_gateway="models",
)

OPERATIONS: tuple[Operation, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, AUDIO_TRANSCRIPTIONS, AUDIO_TRANSLATIONS,
                                     AUDIO_SPEECH, IMAGES_GENERATIONS, IMAGES_EDITS, STORED_RESPONSE, STORED_RESPONSE_INPUT_ITEMS,
                                     STORED_RESPONSE_CANCEL, FILES_UPLOAD, FILES_LIST, FILE, FILE_CONTENT, BATCHES_CREATE,
                                     BATCHES_LIST, BATCH, BATCH_CANCEL, MODELS)
BY_NAME = {op.name: op for op in OPERATIONS}


def batch_line_operation(url: str) -> Operation:
    """The operation a batch line's `url` names."""
    return BY_NAME[BATCH_ENDPOINTS[url]]


def completion_budget(operation: Operation, body: dict[str, Any], default: int) -> int:
    """The most answer tokens a request can cost: its own limit (or the policy's default when it
    sets none) times the number of answers generated (`n`, `best_of`), whether or not a limit was
    given. Zero for operations that write no answer (embeddings)."""
    if not operation.writes:
        return 0
    per_answer = default
    for name in operation.completion_limits:
        value = whole_number(body.get(name))
        if value is not None and value > 0:
            per_answer = value
            break
    answers = 1
    for name in operation.choices:
        value = whole_number(body.get(name))
        if value is not None and value > answers:
            answers = value  # best_of generates best_of answers and returns n of them
    return per_answer * answers
