"""Protocol buffers of DvD (package dvd.v1). Stubs are generated on first import."""

from proto.build import build as _build

_build()
