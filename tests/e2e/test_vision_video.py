"""Video through the real servers equals transformers' InternVL on the same sampled frames.

transformers' own InternVL video processor needs torchvision, so the reference frames are
built here independently: the published sampling formula, PyAV decoding of those frames,
GotOcr2 preprocessing of each frame (one tile, or several and a thumbnail), and the processor's
prompt expansion ("Frame{i}: <img>...</img>" lines in place of <video>).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.client import message, sampling, video
from tests.reference import Reference
from tests.vision_server.helpers import moving_frames, mp4_bytes, pyav_frames

MAX_NEW_TOKENS = 12
FPS = 24
FRAMES = 40
SEGMENTS = 6
QUESTION = "What happens in this video?"


@pytest.fixture(scope="module")
def clip() -> bytes:
    return mp4_bytes(moving_frames(FRAMES), fps=FPS)


@pytest.fixture(scope="module")
def reference(tiny_dirs) -> Reference:
    return Reference(tiny_dirs["hf"], torch.float32)


def published_indices(num_frames: int, num_segments: int) -> list[int]:
    """InternVL's recipe for the whole video, written out independently of the server's code."""
    start, end = 0, num_frames - 1
    seg = float(end - start) / num_segments
    return [int(start + seg / 2 + np.round(seg * i)) for i in range(num_segments)]


def reference_tokens(reference: Reference, clip: bytes, tiles_per_frame: int = 1) -> tuple[list[int], int]:
    """Greedy tokens and prompt length of transformers' InternVL; each frame is tiled like an
    image with up to `tiles_per_frame` tiles plus, when it makes several, the thumbnail (as
    InternVL's load_video does)."""
    frames = pyav_frames(clip)
    images = [Image.fromarray(frames[i]) for i in published_indices(len(frames), SEGMENTS)]
    per_frame = [
        reference.image_processor(images=[frame], max_patches=tiles_per_frame, return_tensors="pt")["pixel_values"]
        for frame in images
    ]
    pixel_values = torch.cat(per_frame)
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = reference.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    blocks = ["<img>" + "<IMG_CONTEXT>" * 256 * len(tiles) + "</img>" for tiles in per_frame]
    frames_text = "\n".join(f"Frame{i + 1}: {block}" for i, block in enumerate(blocks))
    assert text.count("<video>") == 1
    input_ids = reference.tokenizer(text.replace("<video>", frames_text), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = reference.model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
    return out[0, input_ids.shape[1] :].tolist(), int(input_ids.shape[1])


def test_video_greedy_tokens_equal_transformers(fp32_deployment, client_for, reference, clip):
    expected, prompt_tokens = reference_tokens(reference, clip)
    result = client_for(fp32_deployment).generate(
        [message("user", video(clip, num_segments=SEGMENTS), QUESTION)], sampling(max_new_tokens=MAX_NEW_TOKENS)
    )
    assert list(result.token_ids) == expected
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.image_tiles == SEGMENTS and result.usage.image_tokens == SEGMENTS * 256


def test_multi_tile_frames_with_thumbnails_equal_transformers(fp32_deployment, client_for, reference):
    wide = mp4_bytes(moving_frames(FRAMES, width=640, height=240), fps=FPS)  # a 2x1 grid per frame
    expected, prompt_tokens = reference_tokens(reference, wide, tiles_per_frame=2)
    result = client_for(fp32_deployment).generate(
        [message("user", video(wide, num_segments=SEGMENTS, max_tiles_per_frame=2), QUESTION)],
        sampling(max_new_tokens=MAX_NEW_TOKENS),
    )
    assert result.usage.image_tiles == SEGMENTS * 3  # two tiles and the thumbnail per frame
    assert result.usage.prompt_tokens == prompt_tokens
    assert list(result.token_ids) == expected


def test_the_sampled_frames_matter(fp32_deployment, client_for, clip):
    client = client_for(fp32_deployment)
    params = sampling(max_new_tokens=MAX_NEW_TOKENS)
    full = client.generate([message("user", video(clip, num_segments=SEGMENTS), QUESTION)], params)
    still = mp4_bytes([moving_frames(1)[0]] * FRAMES, fps=FPS)
    frozen = client.generate([message("user", video(still, num_segments=SEGMENTS), QUESTION)], params)
    assert list(full.token_ids) != list(frozen.token_ids)


@pytest.mark.parametrize(
    ("part", "detail"),
    [
        (video(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 20), "not a readable video"),
        (video(b"clip", num_segments=65), "num_segments must be in 1..64"),
        (video(b"clip", max_tiles_per_frame=9), "max_tiles_per_frame must be in 1..4"),
    ],
)
def test_bad_videos_are_invalid_argument(fp32_deployment, client_for, clip, part, detail):
    client = client_for(fp32_deployment)
    with pytest.raises(grpc.RpcError) as info:
        client.generate([message("user", part, QUESTION)], sampling(max_new_tokens=2))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in info.value.details()
    good = client.generate([message("user", video(clip, num_segments=2), QUESTION)], sampling(max_new_tokens=2))
    assert len(good.token_ids) == 2 and good.usage.image_tiles == 2
