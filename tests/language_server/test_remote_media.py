"""RemoteMedia: the engine request from the vision servers' answers, features released on
every path, prompts tokenized once (off the event loop), and answers that come in parts."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest
import torch

from language_server.engine.sampling import SamplingParams
from language_server.prompt import PromptBuilder
from language_server.remote_media import RemoteMedia
from language_server.request import ChatMessage, GenerationRequest, ImagePart, TextPart, VideoPart
from pipeline.config import DvDConfig
from pipeline.errors import InternalError, InvalidRequest
from pipeline.stages import Pipeline
from pipeline.wire import FeatureHeader, Features, VisionJob
from tests.language_server.test_media_layout import IMG_A, IMG_B, REQUEST, VIDEO


class _Payload:
    """Stands in for a transport buffer: counts its releases."""

    def __init__(self) -> None:
        self.releases = 0

    def release(self) -> None:
        self.releases += 1


class _FakeVisionClient:
    """Answers each job with `answer(job)`: (header, rows), an exception to raise, or a list of
    those as the answer's parts, with asyncio.Events to wait for between them. Records the jobs
    and the payloads it handed out."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.jobs: list[VisionJob] = []
        self.payloads: list[_Payload] = []

    async def encode_parts(self, job: VisionJob, tiles: int | None = None):
        self.jobs.append(job)
        result = self.answer(job)
        if isinstance(result, BaseException):
            raise result
        for part in result if isinstance(result, list) else [result]:
            if isinstance(part, BaseException):
                raise part
            if isinstance(part, asyncio.Event):  # hold the next part back until the test sets it
                await part.wait()
                continue
            header, rows = part
            payload = _Payload()
            self.payloads.append(payload)
            yield Features(header, rows, keepalive=payload)


def _one_tile(job: VisionJob, frame_tiles: tuple[int, ...] = ()):
    tiles = sum(frame_tiles) or 1
    return _zeros(job, (4,) * tiles, frame_tiles)


def _zeros(job: VisionJob, tile_tokens: tuple[int, ...], frame_tiles: tuple[int, ...] = (), first: int = 0, rows: int | None = None):
    """A part of `job`'s answer: rows [first, first + rows) (default: all) of zeros, 8 wide."""
    rows = sum(tile_tokens) - first if rows is None else rows
    header = FeatureHeader(job.job_id, "r", tile_tokens=tile_tokens, frame_tiles=frame_tiles, shape=(rows, 8), row_offset=first)
    return header, torch.zeros(rows, 8)


def _config(max_model_len: int = 8192) -> DvDConfig:
    config = DvDConfig()
    return replace(config, language=replace(config.language, max_model_len=max_model_len))


def _media(tokenizer, client, max_model_len: int = 8192, system_prompt: str | None = None) -> RemoteMedia:
    prompts = PromptBuilder(tokenizer, system_prompt)
    return RemoteMedia(client, prompts, _config(max_model_len), Pipeline.create(8, 8, 8), group_images=False)


def _run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


def test_features_are_released_when_another_job_fails(tokenizer):
    client = _FakeVisionClient(lambda job: InvalidRequest("bad image") if job.data == b"b" else _one_tile(job))
    two = GenerationRequest("r", (ChatMessage("user", (IMG_A, IMG_B, TextPart("?"))),), SamplingParams())
    with pytest.raises(InvalidRequest, match="bad image"):
        _run(_media(tokenizer, client).engine_request(two, two.sampling))
    assert len(client.jobs) == 2 and [p.releases for p in client.payloads] == [1]


def test_features_are_released_when_the_prompt_fails(tokenizer):
    client = _FakeVisionClient(_one_tile)
    req = GenerationRequest("r", (ChatMessage("user", (IMG_A, TextPart("?"))),), SamplingParams())
    ok, _ = _run(_media(tokenizer, client).engine_request(req, req.sampling))
    assert ok.image_rows.shape == (4, 8) and [p.releases for p in client.payloads] == [1]
    wrong = _FakeVisionClient(lambda job: _one_tile(job, frame_tiles=(1, 1)))  # two images' tiles for one image
    with pytest.raises(InternalError, match="2 images, not 1"):
        _run(_media(tokenizer, wrong).engine_request(req, req.sampling))
    assert [p.releases for p in wrong.payloads] == [1]


def test_video_answers_must_have_one_entry_per_frame(tokenizer):
    req = GenerationRequest("r", (ChatMessage("user", (VIDEO, TextPart("?"))),), SamplingParams())  # 2 segments
    good = _FakeVisionClient(lambda job: _one_tile(job, frame_tiles=(1, 1)))
    assert _run(_media(tokenizer, good).engine_request(req, req.sampling))[0].image_rows.shape == (8, 8)
    short = _FakeVisionClient(lambda job: _one_tile(job, frame_tiles=(2,)))
    with pytest.raises(InternalError, match="1 frames, not 2"):
        _run(_media(tokenizer, short).engine_request(req, req.sampling))
    assert [p.releases for p in short.payloads] == [1]


def test_a_prompt_too_long_without_its_images_fails_before_any_vision_job(tokenizer):
    client = _FakeVisionClient(_one_tile)
    long_text = TextPart("lorem ipsum " * 200)  # ~400 tokens
    req = GenerationRequest("r", (ChatMessage("user", (IMG_A, long_text, VIDEO)),), SamplingParams())
    with pytest.raises(InvalidRequest, match="before its images"):
        _run(_media(tokenizer, client, max_model_len=300).engine_request(req, req.sampling))
    assert client.jobs == []



def test_prompts_are_tokenized_off_the_event_loop(tokenizer):
    client = _FakeVisionClient(_one_tile)
    media = _media(tokenizer, client)
    threads: list[str] = []
    real = media.prompts.tokenizer
    assert media.prompts.max_chars_per_token  # the vocabulary scan needs the real tokenizer

    def tokenize(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    media.prompts.tokenizer = tokenize
    for parts in ((TextPart("hi"),), (IMG_A, TextPart("?"))):
        req = GenerationRequest("r", (ChatMessage("user", parts),), SamplingParams())
        _run(media.engine_request(req, req.sampling))
    assert threads and threading.main_thread().name not in threads


def _rows_per_block(part: ImagePart | VideoPart) -> list[int]:
    """What `_varied` answers: image b has two 4-row tiles, other images one; video frames alternate 1 and 2 tiles."""
    if isinstance(part, ImagePart):
        return [8 if part.data == b"b" else 4]
    return [4 * (1 + i % 2) for i in range(part.num_segments)]


def _varied(job: VisionJob):
    if job.kind == "video":
        frame_tiles = tuple(1 + i % 2 for i in range(job.num_segments))
    else:
        frame_tiles = ()
    tiles = sum(frame_tiles) or (2 if job.data == b"b" else 1)
    return _zeros(job, (4,) * tiles, frame_tiles)


def _rendered(messages: tuple[ChatMessage, ...], system_prompt: str) -> str:
    """The ChatML text of the final prompt, image blocks expanded (the reference the tokenizer splits itself)."""
    if system_prompt and messages[0].role != "system":
        messages = (ChatMessage("system", (TextPart(system_prompt),)), *messages)
    rows = iter([n for m in messages for p in m.parts if not isinstance(p, TextPart) for n in _rows_per_block(p)])

    def block() -> str:
        return "<img>" + "<IMG_CONTEXT>" * next(rows) + "</img>"

    text = ""
    for m in messages:
        text += f"<|im_start|>{m.role}\n"
        for p in m.parts:
            if isinstance(p, TextPart):
                text += p.text
            elif isinstance(p, ImagePart):
                text += block() + "\n"
            else:
                text += "".join(f"Frame{i}: {block()}\n" for i in range(1, p.num_segments + 1))
        text += "<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


class _FakeWorker:
    """The colocated VisionWorker's encode, answering like `_varied`."""

    router = None

    def encode(self, jobs):
        return [_varied(job) for job in jobs]


VIDEO_3 = VideoPart(b"v", num_segments=3, max_tiles_per_frame=2)
ONCE_CASES = {
    "text_only": ((ChatMessage("user", (TextPart("Hello there!"),)),), ""),
    "one_image": ((ChatMessage("user", (IMG_A, TextPart("What is this?"))),), ""),
    "two_images": ((ChatMessage("user", (TextPart("Compare "), IMG_A, TextPart(" and "), IMG_B, TextPart("."))),), ""),
    "video": ((ChatMessage("user", (VIDEO_3, TextPart("What happens?"))),), ""),
    "configured_system": ((ChatMessage("user", (IMG_B, VIDEO_3, TextPart("你好 🙂"))),), "Be kind."),
    "system_and_turns": (
        (
            ChatMessage("system", (TextPart("You are terse."),)),
            ChatMessage("user", (TextPart("Look: "), IMG_A, TextPart("and describe"))),
            ChatMessage("assistant", (TextPart("A cat."),)),
            ChatMessage("user", (VIDEO_3, IMG_B, TextPart("Now these?"))),
        ),
        "Ignored.",
    ),
}


@pytest.mark.parametrize("mode", ["decoupled", "colocated"])
@pytest.mark.parametrize("name", list(ONCE_CASES))
def test_a_request_is_tokenized_once_into_the_same_ids(tokenizer, name, mode):
    from pipeline.entrypoints.colocated import InlineMedia

    messages, system_prompt = ONCE_CASES[name]
    prompts = PromptBuilder(tokenizer, system_prompt)
    assert prompts.max_chars_per_token  # the vocabulary scan needs the real tokenizer
    calls: list[object] = []

    def tokenize(*args, **kwargs):
        calls.append(args[0])
        return tokenizer(*args, **kwargs)

    prompts.tokenizer = tokenize
    if mode == "decoupled":
        preparer = RemoteMedia(_FakeVisionClient(_varied), prompts, _config(), Pipeline.create(8, 8, 8), False)
    else:
        preparer = InlineMedia(_FakeWorker(), prompts, _config())
    req = GenerationRequest("r", messages, SamplingParams())
    request, trace = _run(preparer.engine_request(req, req.sampling))
    token_ids = request.prepare()[0] if request.prepare is not None else request.prompt_ids
    assert len(calls) == 1
    assert token_ids == tokenizer(_rendered(messages, system_prompt))["input_ids"]
    assert trace.image_tokens == token_ids.count(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))


def _part(job: VisionJob, tile_tokens, frame_tiles, first: int, stop: int):
    """Rows [first, stop) of `job`'s answer, each row filled with its number in the job plus 100 x
    the job's first byte (so rows of different jobs differ)."""
    rows = (torch.arange(first, stop, dtype=torch.float32) + 100 * (job.data or b"g")[0])[:, None].expand(-1, 8)
    header = FeatureHeader(job.job_id, "r", tile_tokens=tile_tokens, frame_tiles=frame_tiles,
                           shape=(stop - first, 8), row_offset=first)
    return header, rows.contiguous()


def test_answers_in_parts_fill_the_rows_in_prompt_order_as_they_arrive(tokenizer):
    """The engine request exists once every job's first part is here; the rows a part brings
    become ready as far as the prompt order allows (an image cut by a part counts up to the cut)."""
    async def scenario():
        held = asyncio.Event()

        def answer(job):
            if job.kind == "video":
                return _part(job, (4, 4), (1, 1), 0, 8)
            return [_part(job, (4, 4, 4), (1, 2), 0, 6), held, _part(job, (4, 4, 4), (1, 2), 6, 12)]

        client = _FakeVisionClient(answer)
        media = RemoteMedia(client, PromptBuilder(tokenizer), _config(), Pipeline.create(8, 8, 8), group_images=True)
        request, trace = await asyncio.wait_for(media.engine_request(REQUEST, REQUEST.sampling), 60)
        rows = request.image_rows
        placeholders = [i for i, t in enumerate(request.prompt_ids) if t == media.prompts.img_context]
        # prompt rows: a = 0..3, video = 4..11, b = 12..19; b's rows 0..1 (its job's rows 4..5) are here
        assert (rows.ready_rows, rows.complete) == (14, False)
        assert rows.ready_tokens(len(request.prompt_ids)) == placeholders[14]
        woken = threading.Event()
        rows.notify = woken.set
        held.set()
        await asyncio.wait_for(trace.feeder, 60)
        assert rows.complete and woken.is_set() and rows.error is None
        images, video = client.jobs
        expected = torch.cat([
            _part(images, (4, 4, 4), (1, 2), 0, 4)[1], _part(video, (4, 4), (1, 1), 0, 8)[1],
            _part(images, (4, 4, 4), (1, 2), 4, 12)[1],
        ])
        assert torch.equal(rows.tensor, expected)
        assert [p.releases for p in client.payloads] == [1, 1, 1]
        assert trace.payload_bytes == 0  # the fake client's headers carry no payload size

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["error", "cancel"])
def test_a_part_that_never_comes_fails_the_rows_or_is_released_on_cancel(tokenizer, how):
    async def scenario():
        held = asyncio.Event()

        def answer(job):
            later = InternalError("vision server failed mid-answer") if how == "error" else held
            return [_part(job, (4, 4), (), 0, 4), later, _part(job, (4, 4), (), 4, 8)]

        client = _FakeVisionClient(answer)
        single = GenerationRequest("s", (ChatMessage("user", (IMG_A, TextPart("?"))),), SamplingParams())
        media = _media(tokenizer, client)
        request, trace = await asyncio.wait_for(media.engine_request(single, single.sampling), 60)
        rows = request.image_rows
        assert rows.ready_rows == 4 and not rows.complete
        if how == "cancel":
            trace.cancel()
        with pytest.raises(asyncio.CancelledError) if how == "cancel" else _no_error():
            await asyncio.wait_for(trace.feeder, 60)
        if how == "error":
            assert isinstance(rows.error, InternalError) and "mid-answer" in str(rows.error)
        assert not rows.complete and [p.releases for p in client.payloads] == [1]

    asyncio.run(scenario())


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
