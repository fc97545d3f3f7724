"""Invariant 1: the vision process holds no LLM weights and the language process no vision weights."""

from __future__ import annotations

import grpc

from pipeline.model.checkpoint import open_model
from proto.dvd.v1 import admin_pb2, admin_pb2_grpc


def _info(address: str) -> admin_pb2.ServerInfo:
    with grpc.insecure_channel(address) as channel:
        return admin_pb2_grpc.AdminStub(channel).GetServerInfo(admin_pb2.GetServerInfoRequest(), timeout=30)


def test_each_server_process_loaded_only_its_half(fp32_deployment):
    config = fp32_deployment.config
    vision = _info(f"{config.vision.host}:{config.vision.grpc_port}")
    language = _info(fp32_deployment.address)
    checkpoint = open_model("tiny")
    llm_names = set(checkpoint.part_names("llm"))
    vision_names = set(checkpoint.part_names("vision")) | set(checkpoint.part_names("projector"))

    assert (vision.role, language.role) == ("vision", "language")
    assert vision.pid != language.pid
    assert set(vision.loaded_tensors) == vision_names
    assert set(language.loaded_tensors) == llm_names

    def nbytes(names: set[str]) -> int:
        return sum(t.numel() * 4 for _, t in checkpoint._read(sorted(names)))

    # Parameter memory held by each process equals its own half of the checkpoint (float32).
    assert vision.parameter_bytes == nbytes(vision_names)
    assert language.parameter_bytes == nbytes(llm_names)
