"""The fp16 overflow gate is judged on the audit of the exported graph alone, whatever verify says."""
from __future__ import annotations

import pytest

from trtvae.export.fp16.decide import overflow_gate

OVER = {"max_abs": 65505.0, "worst_layer": "decoder.mid_block.resnets.0", "rescale_possible": True,
        "declares_force_upcast": False}


@pytest.mark.parametrize("verify", [None, {"status": "passed"}, {"status": "skipped"},
                                    {"status": "failed", "reason": "2 accuracy check(s) failed, 12 NaN/inf"}])
def test_a_graph_over_65504_never_passes(verify):
    message = overflow_gate({"audit": OVER}, verify)
    assert message.startswith("fp16 overflow: ") and "65505 > 65504 at decoder.mid_block.resnets.0" in message
    assert "\n" not in message and "No manifest was written" in message
    assert ("verify passed, but" in message) == (verify == {"status": "passed"})
    if verify and verify["status"] == "failed":
        assert "12 NaN/inf" in message


def test_the_exported_graph_is_judged_not_the_source():
    fits = {**OVER, "max_abs": 65504.0}
    assert overflow_gate({"audit": fits}) is None
    assert overflow_gate({"audit": OVER, "audit_after_rescale": {**OVER, "max_abs": 3957.0}}) is None  # rescaled
    assert "bf16 or fp32" in overflow_gate({"audit": {**OVER, "rescale_possible": False}})
    assert "without --no-rescale" in overflow_gate({"audit": OVER})
