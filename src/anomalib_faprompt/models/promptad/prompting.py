"""PromptAD's manual anomaly states and object names, verbatim from the release (README: Method).

The texts are the authors' own, typos included ("particals", "melded"): they change the embeddings, so they
are kept as written. Categories not listed get the eight generic states only.

Example:
    >>> from anomalib_faprompt.models.promptad.prompting import manual_states, object_name
    >>> object_name("metal_nut")
    'metal nut'
    >>> manual_states("bottle")[-3:]
    ['{} with large breakage', '{} with small breakage', '{} with contamination']
    >>> len(manual_states("an_unlisted_category"))
    8
"""

from __future__ import annotations

#: Object names that differ from the category folder name (``ad_prompts.py:3-13``); others are used verbatim.
OBJECT_NAMES = {
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum",
    "chewinggum": "chewing gum",
    "metal_nut": "metal nut",
}

#: The generic anomaly states every category gets first (``ad_prompts.py:16-23``).
GENERIC_STATES = (
    "damaged {}",
    "flawed {}",
    "abnormal {}",
    "imperfect {}",
    "blemished {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

_PCB = ("{} with bent", "{} with scratch", "{} with missing", "{} with melt")
_MACARONI = (
    "{} with color spot",
    "{} with small chip around edge",
    "{} with small scratches",
    "{} with breakage",
    "{} with cracks",
)

#: Category-specific states appended to the generic ones, keyed by the category folder name (``ad_prompts.py:28-57``).
CATEGORY_STATES: dict[str, tuple[str, ...]] = {
    # MVTec AD
    "bottle": ("{} with large breakage", "{} with small breakage", "{} with contamination"),
    "toothbrush": ("{} with defect", "{} with anomaly"),
    "carpet": (
        "{} with hole",
        "{} with color stain",
        "{} with metal contamination",
        "{} with thread residue",
        "{} with thread",
        "{} with cut",
    ),
    "hazelnut": ("{} with crack", "{} with cut", "{} with hole", "{} with print"),
    "leather": ("{} with color stain", "{} with cut", "{} with fold", "{} with glue", "{} with poke"),
    "cable": ("{} with bent wire", "{} with missing part", "{} with missing wire", "{} with cut", "{} with poke"),
    "capsule": (
        "{} with crack",
        "{} with faulty imprint",
        "{} with poke",
        "{} with scratch",
        "{} squeezed with compression",
    ),
    "grid": (
        "{} with breakage",
        "{} with thread residue",
        "{} with thread",
        "{} with metal contamination",
        "{} with glue",
        "{} with a bent shape",
    ),
    "pill": (
        "{} with color stain",
        "{} with contamination",
        "{} with crack",
        "{} with faulty imprint",
        "{} with scratch",
        "{} with abnormal type",
    ),
    "transistor": ("{} with bent lead", "{} with cut lead", "{} with damage", "{} with misplaced transistor"),
    "metal_nut": ("{} with a bent shape ", "{} with color stain", "{} with a flipped orientation", "{} with scratch"),
    "screw": ("{} with manipulated front", "{} with scratch neck", "{} with scratch head"),
    "zipper": (
        "{} with broken teeth",
        "{} with fabric border",
        "{} with defect fabric",
        "{} with broken fabric",
        "{} with split teeth",
        "{} with squeezed teeth",
    ),
    "tile": ("{} with crack", "{} with glue strip", "{} with gray stroke", "{} with oil", "{} with rough surface"),
    "wood": ("{} with color stain", "{} with hole", "{} with scratch", "{} with liquid"),
    # VisA
    "candle": (
        "{} with melded wax",
        "{} with foreign particals",
        "{} with extra wax",
        "{} with chunk of wax missing",
        "{} with weird candle wick",
        "{} with damaged corner of packaging",
        "{} with different colour spot",
    ),
    "capsules": ("{} with scratch", "{} with discolor", "{} with misshape", "{} with leak", "{} with bubble"),
    "cashew": (
        "{} with breakage",
        "{} with small scratches",
        "{} with burnt",
        "{} with stuck together",
        "{} with spot",
    ),
    "chewinggum": (
        "{} with corner missing",
        "{} with scratches",
        "{} with chunk of gum missing",
        "{} with colour spot",
        "{} with cracks",
    ),
    "fryum": (
        "{} with breakage",
        "{} with scratches",
        "{} with burnt",
        "{} with colour spot",
        "{} with fryum stuck together",
        "{} with colour spot",  # repeated in the release: it weighs twice in the anomaly prototype
    ),
    "macaroni1": _MACARONI,
    "macaroni2": _MACARONI,
    "pcb1": _PCB,
    "pcb2": _PCB,
    "pcb3": _PCB,
    "pcb4": (
        "{} with scratch",
        "{} with extra",
        "{} with missing",
        "{} with wrong place",
        "{} with damage",
        "{} with burnt",
        "{} with dirt",
    ),
    "pipe_fryum": (
        "{} with breakage",
        "{} with small scratches",
        "{} with burnt",
        "{} with stuck together",
        "{} with colour spot",
        "{} with cracks",
    ),
}


def object_name(category: str) -> str:
    """The object's name in the prompts: the category name, or its mapped name (``metal_nut`` -> ``metal nut``)."""
    return OBJECT_NAMES.get(category, category)


def manual_states(category: str) -> list[str]:
    """The manual anomaly states of a category: the generic ones, then its own (none for unlisted categories)."""
    return [*GENERIC_STATES, *CATEGORY_STATES.get(category, ())]


def has_category_states(category: str) -> bool:
    """Whether the release wrote manual anomaly states for this category."""
    return category in CATEGORY_STATES
