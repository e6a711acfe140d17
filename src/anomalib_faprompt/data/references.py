"""The sampling of few-shot references: which k normal images of a train split a seed picks.

One function, used by every consumer of references, so that a seed names the same images everywhere: the
prompt models' visual memory (``k_shot``, ``reference_seed``) and the ``zero_shot`` pipeline's few-shot
protocol, which gives the same images to its baselines (WinClip's references, PatchCore's fit).

Example:
    >>> import pandas as pd
    >>> samples = pd.DataFrame({"image_path": ["a.png", "b.png", "c.png", "d.png"], "label_index": [0, 1, 0, 0]})
    >>> sample_normal_references(samples, k_shot=2, seed=0)
    [3, 0]
"""

from __future__ import annotations

import pandas as pd
import torch


def sample_normal_references(samples: pd.DataFrame, k_shot: int, seed: int) -> list[int]:
    """Positions (``iloc``) of ``k_shot`` normal rows of a dataset's ``samples``, drawn with ``seed``.

    The normal rows (``label_index == 0``) are permuted by ``torch.randperm`` with a generator seeded by
    ``seed`` and the first ``k_shot`` are kept, in that order: the same samples and seed give the same images
    on every machine, and the first k of a larger draw are the images of a smaller one with the same seed.

    Args:
        samples: An anomalib dataset's ``samples`` (``label_index`` column; ``image_path`` names the images).
        k_shot: How many references; fewer are returned when fewer normal rows exist (callers refuse that,
            naming where they looked).
        seed: Seed of the draw.

    Returns:
        Row positions, at most ``k_shot``.
    """
    normal = (samples["label_index"] == 0).to_numpy().nonzero()[0].tolist()
    order = torch.randperm(len(normal), generator=torch.Generator().manual_seed(seed))[:k_shot].tolist()
    return [int(normal[index]) for index in order]
