"""Engine fixtures: the tiny LLM, transformers' reference answers, and engines whose KV pool is
checked to be empty after every test."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import pytest
import torch

from language_server.engine.engine import Engine
from language_server.engine.sampling import SamplingParams
from language_server.engine.sequence import EngineOutput, EngineRequest
from language_server.model import LanguageModel
from pipeline.config import LanguageConfig
from tests.conftest import photo_bytes
from tests.reference import Reference, img, text

MAX_STEPS = 20_000  # bound on every engine drive loop


@dataclass
class Case:
    """One request with the tokens transformers' `generate` produced for it."""

    request_id: str
    prompt_ids: list[int]
    image_rows: torch.Tensor | None
    max_new_tokens: int
    expected: list[int]

    def request(self, **params) -> EngineRequest:
        sampling = SamplingParams(max_new_tokens=self.max_new_tokens, **params)
        return EngineRequest(self.request_id, list(self.prompt_ids), sampling, self.image_rows)


@dataclass
class Collected:
    """Everything the engine handed one request's sink."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    outputs: int = 0
    finish_reason: str | None = None
    error: Exception | None = None
    after_finish: int = 0  # outputs delivered after the final one (must stay 0)

    def __call__(self, output: EngineOutput) -> None:
        if self.finish_reason is not None or self.error is not None:
            self.after_finish += 1
        self.outputs += 1
        self.token_ids += output.token_ids
        self.text += output.text
        self.finish_reason = output.finish_reason
        self.error = output.error

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


def drive(
    engine: Engine,
    arrivals: list[tuple[int, EngineRequest]],
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Collected]:
    """Add each request before step number `arrival` and step until every request has finished."""
    results: dict[str, Collected] = {}
    pending = sorted(arrivals, key=lambda a: a[0])
    for step in range(MAX_STEPS):
        while pending and pending[0][0] <= step:
            request = pending.pop(0)[1]
            results[request.request_id] = Collected()
            engine.add_request(request, results[request.request_id])
        if not pending and all(r.finished for r in results.values()):
            return results
        engine.step()
        if on_step is not None:
            on_step(step)
    raise AssertionError(f"requests still unfinished after {MAX_STEPS} steps")


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run on one torch thread. These models are tiny, and on a machine shared with other test
    runs, idle OpenMP workers spin-waiting for busy cores cost far more than a second thread gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def single_threaded_test() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def engine_lm(tiny_dirs) -> LanguageModel:
    """The tiny Qwen3 LLM in float32, loaded the way the language server loads it."""
    from pipeline.model.checkpoint import open_model

    model, _ = LanguageModel.from_checkpoint(open_model(str(tiny_dirs["hf"])), "cpu", torch.float32)
    return model


@pytest.fixture(scope="session")
def reference(tiny_dirs) -> Reference:
    return Reference(tiny_dirs["hf"], torch.float32)


@pytest.fixture(scope="session")
def stop_ids(reference) -> tuple[int, ...]:
    """The end-of-sequence ids transformers' `generate` stops on for this checkpoint."""
    eos = reference.model.generation_config.eos_token_id
    return tuple(eos if isinstance(eos, list) else [eos])


def _conversations() -> list[tuple[list[dict], int]]:
    """16 conversations of mixed lengths (20 to ~1800 prompt tokens), with and without images."""
    small = {name: photo_bytes(name) for name in ("astronaut", "camera", "immunohistochemistry", "logo", "page")}
    large = {name: photo_bytes(name) for name in ("coffee", "hubble_deep_field")}
    story = "Once upon a time a lighthouse keeper counted the ships that passed in the night. " * 6
    user = lambda *parts: {"role": "user", "content": list(parts)}  # noqa: E731
    return [
        ([user(text("Hi!"))], 6),
        ([user(img(small["astronaut"]), text("What is in this image?"))], 12),
        ([user(text(story + "How many ships were there?"))], 10),
        ([user(img(large["coffee"]), text("Describe the drink."))], 8),
        ([user(img(small["camera"]), text("Who holds the camera?"))], 5),
        ([user(text("Name three colours."))], 16),
        ([user(img(small["page"]), text("Read the page."))], 9),
        ([user(img(small["astronaut"]), img(small["logo"]), text("Compare the two images."))], 7),
        ([user(img(large["hubble_deep_field"]), text("What do you see?"))], 11),
        ([user(text("Count to five."))], 4),
        ([user(img(small["immunohistochemistry"]), text("Which stain is this?"))], 13),
        (
            [
                user(img(small["logo"]), text("Describe the picture.")),
                {"role": "assistant", "content": [text("A logo on a white background.")]},
                user(text("What colour is it?")),
            ],
            6,
        ),
        ([user(text(story[:200] + " Continue the story."))], 15),
        ([user(img(small["page"]), img(small["camera"]), text("Which one has text?"))], 3),
        ([user(text("Why is the sky blue?"))], 12),
        ([user(img(small["camera"]), text("Is this photo in colour?"))], 8),
    ]


@pytest.fixture(scope="session")
def mixed_cases(reference) -> list[Case]:
    """The 16 conversations as engine inputs (token ids + image feature rows from transformers'
    own vision tower and projector), each with `InternVLForConditionalGeneration.generate`'s tokens."""
    with one_torch_thread():
        return [_case(f"case-{i}", c, n, reference) for i, (c, n) in enumerate(_conversations())]


@torch.inference_mode()
def _case(request_id: str, conversation: list[dict], max_new_tokens: int, reference: Reference) -> Case:
    model = reference.model
    inputs = reference.inputs(conversation)
    expected = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    rows = None
    if "pixel_values" in inputs:
        features = model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
        rows = features.reshape(-1, features.shape[-1]).clone()
    prompt = inputs["input_ids"][0].tolist()
    return Case(request_id, prompt, rows, max_new_tokens, expected[0, len(prompt) :].tolist())


@pytest.fixture
def make_engine(engine_lm, tokenizer) -> Iterator[Callable[..., Engine]]:
    """Factory: an Engine (on the tiny LLM unless another model is given) with LanguageConfig
    overrides. After the test, every engine it made must hold no KV block and no request."""
    engines: list[Engine] = []

    def make(model: LanguageModel | None = None, tokenizer_=None, unchecked: bool = False, **overrides) -> Engine:
        """`unchecked`: skip the config check, to build a KV pool smaller than max_model_len."""
        config = replace(LanguageConfig(num_kv_blocks=4096), **overrides)
        if not unchecked:
            config.check()
        engine = Engine(model or engine_lm, tokenizer_ or tokenizer, config)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
        assert engine.kv_blocks_used == 0 and engine.kv_usage == 0.0
        assert engine.num_running == 0 and engine.num_waiting == 0
