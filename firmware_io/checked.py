"""Config models whose rules across keys can be run apart from their field checks.

pydantic runs a model's "after" validators only when every field is valid, so a file with
one typo would hide every impossible combination. A ``Checked`` model lists its rules in
``checks()``; validated normally it raises for them as usual, validated with
``context=DEFER_CHECKS`` it leaves them to the caller (agent.config), which runs each rule
whose keys are valid and reports all problems together.
"""

from __future__ import annotations

from typing import Callable, Optional

from pydantic import BaseModel, ValidationInfo, model_validator

# (key inside the section, or "" for the section as a whole; what is wrong)
Problem = tuple[str, str]
Check = Callable[[], Optional[Problem]]

DEFER_CHECKS = {"defer_checks": True}


def not_empty(v):
    # Path("") is ".", the working directory: an empty path would silently name a folder.
    if isinstance(v, str) and not v.strip():
        raise ValueError("is empty; name a path")
    return v


class Checked(BaseModel):
    def checks(self) -> list[Check]:
        """One bound method per rule; each returns a Problem or None."""
        return []

    def problems(self) -> list[Problem]:
        return [p for p in (check() for check in self.checks()) if p is not None]

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo):
        if not (info.context or {}).get("defer_checks"):
            found = self.problems()
            if found:
                raise ValueError("; ".join(f"{k}: {m}" if k else m for k, m in found))
        return self
