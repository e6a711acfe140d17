"""Scoring a batch synchronises with the host once: the forward queues its work and waits for nothing.

On an accelerator every value read back to the host (``.item()``, ``bool(tensor)``, ``nonzero``, boolean
indexing) stalls the queue until the work before it is done, so the next batch cannot be queued while this one
runs. CI has no GPU, but these reads are the same operators on a CPU: a dispatch mode counts them through a whole
Lightning step, the torch model's forward included.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from anomalib.data import ImageBatch
from torch.utils._python_dispatch import TorchDispatchMode

from anomalib_faprompt.methods import METHODS
from anomalib_faprompt.prompt_weights import NonFiniteValuesError

aten = torch.ops.aten

#: Operators whose result the host must wait for on an accelerator (a scalar read, or an output size that depends
#: on the values).
SYNCHRONISING = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
}


class HostReads(TorchDispatchMode):
    """Counts the synchronising operators dispatched while it is active (boolean-mask indexing included)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func is aten.index.Tensor and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1]
        )
        if func in SYNCHRONISING or boolean_index:
            self.counts[str(func)] += 1
        return func(*args, **kwargs)


def scoring_model(method: str, settings: dict):
    torch.manual_seed(0)
    model = METHODS[method].load()(**settings, allow_untrained_prompts=True)
    if method == "PromptAD":  # it scores against a visual memory of normal images
        model.model.add_references(torch.randn(2, 3, settings["image_size"], settings["image_size"]))
    return model.eval()


def batch_of(images: torch.Tensor) -> ImageBatch:
    return ImageBatch(image=images, image_path=[f"frame_{index}.png" for index in range(len(images))])


@pytest.mark.parametrize("method", list(METHODS))
def test_a_test_step_reads_one_value_back_to_the_host(method, method_settings):
    settings = method_settings[method]
    model = scoring_model(method, settings)
    images = torch.randn(3, 3, settings["image_size"], settings["image_size"])
    with torch.no_grad():
        model.test_step(batch_of(images))  # anything done once (text features, caches) happens here
        with HostReads() as reads:
            model.test_step(batch_of(images))
    # The finiteness verdict on inputs and outputs together; nothing in the forward.
    assert sum(reads.counts.values()) == 1, dict(reads.counts)
    assert reads.counts[str(aten._local_scalar_dense.default)] == 1


def test_the_input_is_named_when_the_forward_fails_on_its_non_finite_values(small_clip, monkeypatch):
    model = scoring_model("AnomalyCLIP", small_clip)
    images = torch.rand(2, 3, small_clip["image_size"], small_clip["image_size"])
    images[1, 0, 3, 3] = math.nan

    def failing_forward(*args, **kwargs):
        msg = "a kernel that refuses NaN"
        raise RuntimeError(msg)

    monkeypatch.setattr(model.model, "forward", failing_forward)
    with pytest.raises(NonFiniteValuesError, match=r"1 input image.*non-finite.*frame_1\.png"):
        model.test_step(batch_of(images))
    images[1, 0, 3, 3] = 0.5
    with pytest.raises(RuntimeError, match="a kernel that refuses NaN"):  # finite inputs: the forward's own error
        model.test_step(batch_of(images))
