"""Methods DvD adds to vLLM's workers (engine argument `worker_extension_cls`), called through
`AsyncLLM.collective_rpc`."""

from __future__ import annotations


class ParameterReport:
    """Mixed into each vLLM worker: what its model holds, so DvD can show (and test) that the
    engine loaded the language model alone."""

    def dvd_parameters(self) -> list[tuple[str, int]]:
        """(name, bytes) of every parameter of this worker's model."""
        model = self.get_model()
        return [(name, p.numel() * p.element_size()) for name, p in model.named_parameters()]
