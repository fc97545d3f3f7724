"""A checkpoint whose chat template lays prompts out differently from DvD's builder: the server
says so at start-up, with the difference, and still serves."""

from __future__ import annotations

import json
import shutil

from pipeline.client import DvDClient, message
from pipeline.entrypoints.launch import Deployment
from pipeline.model.tiny_model import tiny_model_dir
from proto.dvd.v1 import generate_pb2 as pb
from tests.conftest import TINY_CONFIG, port_overrides

# ChatML with a colon after the role: not the internvl2_5 layout the prompt builder writes.
OTHER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant:\n{% endif %}"
)


def test_a_checkpoint_with_another_chat_template_is_named_at_start_up(tmp_path, tiny_dirs):
    source = tiny_model_dir("hf")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for path in source.iterdir():
        if path.name == "model.safetensors":
            (checkpoint / path.name).symlink_to(path)
        elif path.name != "chat_template.jinja":
            shutil.copy(path, checkpoint / path.name)
    (checkpoint / "chat_template.jinja").write_text(OTHER_TEMPLATE)

    overrides = {**port_overrides(), "mode": "colocated", "model.path": str(checkpoint)}
    with Deployment(TINY_CONFIG, overrides, log_dir=tmp_path / "logs") as deployment:
        with DvDClient(deployment.address) as client:
            answer = client.generate([message("user", "Hello")], pb.SamplingParameters(max_new_tokens=2, temperature=0))
        assert answer.usage.completion_tokens == 2
    records = [json.loads(line) for line in (tmp_path / "logs" / "colocated.log").read_text().splitlines()
               if line.startswith("{")]
    (warning,) = [r for r in records if "differs from this checkpoint's chat template" in r.get("msg", "")]
    assert warning["level"] == "warning"
    assert "user:\\n" in warning["difference"] and str(checkpoint) == warning["checkpoint"]
