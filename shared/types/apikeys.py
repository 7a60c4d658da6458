"""OpenAI API keys: what the admin API takes and returns, and what Redis keeps.

A key's secret is shown once, when it is created; Redis keeps its SHA-256
digest (`shared/state/apikeys.py`). Each key may carry a request rate
(requests per second) and a token quota (prompt and completion tokens per
minute), enforced by every router together.
"""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, ConfigDict, Field

SECRET_PREFIX = "sk-shoal-"
# What a listing shows of a secret, so that an operator can tell keys apart.
SHOWN_CHARS = len(SECRET_PREFIX) + 6
_KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$"
KEY_ID = re.compile(r"^key-[0-9a-f]{12}$")


def digest(secret: str) -> str:
    """What is stored of a secret. Secrets are 256 random bits, so one SHA-256 is enough: a slow key
    derivation guards guessable passwords, and every request pays for it."""
    return hashlib.sha256(secret.encode()).hexdigest()


class APIKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63, pattern=_KEY_NAME, description="Who or what uses the key.")
    requests_per_s: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="Requests per second (bursts up to one second's worth). Null: no limit.",
    )
    tokens_per_min: int | None = Field(
        default=None, gt=0, le=10**12, description="Prompt plus completion tokens per minute. Null: no quota."
    )


class APIKeyPublic(APIKeyCreate):
    id: str = Field(description="The key's id (not secret): what the admin API and metrics name it by.")
    shown: str = Field(description="The first characters of the secret.")
    created_at: float
    revoked_at: float | None = None


class APIKeyRecord(APIKeyPublic):
    """What Redis holds: the public fields and the secret's digest."""

    digest: str

    def public(self) -> APIKeyPublic:
        return APIKeyPublic.model_validate(self.model_dump(exclude={"digest"}))


class APIKeyCreated(APIKeyPublic):
    key: str = Field(description="The secret: send it as `Authorization: Bearer <key>`. Shown only this once.")
