"""Moved to ``ssau.shard.schema`` (issue 21); this name stays for code that followed the README before."""

from ssau.shard.schema import hf_features, sample_arrow_type  # noqa: F401
