"""Annotation prompts, written from the label schema.

The system prompt says who the model is; the user prompt is the rubric: every field
of `schema.FIELDS` with its type, guidance and allowed values. Because the rubric is
generated, a field added to the schema shows up in the prompt, the parser and the
metrics at once. Users can replace either prompt with a file of their own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schema import FIELDS, LabelField

SYSTEM_PROMPT = (
    "You label dashcam video for an autonomous-driving team. Your labels become "
    "training and test data for self-driving systems, so they must be precise and "
    "must not invent what the clip does not show. Give particular care to anything "
    "that affects safety: vulnerable road users, other vehicles' moves, signals, "
    "signs and the state of the road.\n\n"
    "Watch the whole clip, then answer the rubric in the user message with one JSON object."
)


def _type_of(spec: LabelField) -> str:
    base = {
        "category": "string, one of the values below",
        "multi_category": "list of strings from the values below",
        "text": "string",
        "difficulty": "integer 1-4",
        "boolean": 'string "True" or "False"',
    }[spec.kind]
    return f"{base}, or null" if spec.nullable else base


def _describe(spec: LabelField) -> str:
    lines = [f'"{spec.name}" ({_type_of(spec)}): {spec.guidance}']
    if spec.kind in ("category", "multi_category"):
        lines += [f'    - "{choice}"' for choice in spec.choices]
    elif spec.examples:
        lines.append("    e.g. " + " | ".join(f'"{example}"' for example in spec.examples))
    return "\n".join(lines)


def rubric_prompt() -> str:
    """The user prompt: the full rubric, one entry per schema field, in schema order."""
    body = "\n\n".join(_describe(spec) for spec in FIELDS)
    return (
        "Label this driving clip. Reply with a single JSON object holding exactly these "
        f"{len(FIELDS)} keys, in this order, and nothing else.\n\n{body}"
    )


# A fine-tuned model has learned the rubric; a short prompt saves ~1,300 prompt tokens
# per clip at inference. Only use it with a model trained on it.
SHORT_PROMPT = "Label this driving clip as JSON with the usual keys."


PROMPTS_FILE = "prompts.json"  # in a model folder: the prompts it was trained with


@dataclass(frozen=True)
class Prompts:
    system: str
    user: str

    @property
    def sha(self) -> str:
        """A short stable hash: captions and judge scores record which prompts made them."""
        return hashlib.sha256(f"{self.system}\x00{self.user}".encode()).hexdigest()[:12]

    def save(self, folder: str | Path) -> Path:
        """Write `prompts.json` ({"system", "user"}) into a model folder, for users of the model without avlabel."""
        path = Path(folder) / PROMPTS_FILE
        path.write_text(json.dumps({"system": self.system, "user": self.user}, indent=2, ensure_ascii=False) + "\n",
                        encoding="utf-8")
        return path


def load_prompts(system_file: str | Path | None = None, user_file: str | Path | None = None, short: bool = False) -> Prompts:
    """The default prompts, with either one replaced by the contents of a user's file."""
    system = Path(system_file).read_text(encoding="utf-8").strip() if system_file else SYSTEM_PROMPT
    if user_file:
        user = Path(user_file).read_text(encoding="utf-8").strip()
    else:
        user = SHORT_PROMPT if short else rubric_prompt()
    return Prompts(system=system, user=user)


def build_conversation(prompts: Prompts, video: Any = None, answer: str | None = None) -> list[dict]:
    """The chat that training and inference both give the model: system, user (the video, then the
    rubric) and, when `answer` is given, the assistant turn."""
    video_part = {"type": "video"} if video is None else {"type": "video", "video": video}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": prompts.system}]},
        {"role": "user", "content": [video_part, {"type": "text", "text": prompts.user}]},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages
