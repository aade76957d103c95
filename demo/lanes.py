"""Lanes: which visitor may use which model, and which models visitors are using right now.

Every visitor is an anonymous stranger, so what one creates stays theirs: a run trained in the Train tab is
owned by the visitor who trained it (an *owner key*), and only that visitor lists, selects, downloads or
cancels it, unless the operator shares runs on purpose (`--share-runs`). Models the operator configured (the
embedded one, `--checkpoint`) have no owner and are everyone's. An owner key is `s:<session_hash>` (one per
page load, one per `gradio_client.Client`) or, once the browser has shown its remembered token,
`b:<sha256 of the token>`, so a page reload (or a server restart) keeps a browser's runs.

Each session's choice lives in the session (a `gr.State`); this registry only mirrors it, so pruning can
keep every model some live session is using. No Gradio here: tests drive it directly.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable

from finetune.errors import ConfigError

SESSION_TTL_S = 6 * 3600  # a selection nobody released (API clients never unload) stops pinning after this
MIN_TOKEN_CHARS, MAX_TOKEN_CHARS = 16, 128
NOBODY = "nobody"  # owner of runs found on disk without a record: no session has this key, so shared only


def not_yours(kind: str, name: str) -> ConfigError:
    """The one refusal for a model or run a visitor may not use: it reads the same whether it exists."""
    return ConfigError(f"no {kind} '{name[:80]}' here for you; pick one from the Model menu or train one.")


class Lanes:
    """Owners of runs, owner keys of sessions, and each session's model in use (for pruning)."""

    def __init__(self, share_runs: bool = False, session_ttl_s: float = SESSION_TTL_S) -> None:
        self.share_runs = share_runs
        self.session_ttl_s = session_ttl_s
        self._run_owners: dict[str, str] = {}  # model name -> owner key; absent: the operator's, for all
        self._session_owners: dict[str, str] = {}  # session hash -> owner key from a browser token
        self._in_use: dict[str, tuple[str, float]] = {}  # session hash -> (model name, when selected)
        self._lock = threading.Lock()

    def owner_key(self, session_hash: str | None) -> str:
        """The owner key of a session: its browser's, when bound, else its own."""
        session = session_hash or ""
        with self._lock:
            return self._session_owners.get(session) or f"s:{session}"

    def bind_browser(self, session_hash: str, token: str) -> str:
        """Make the browser's remembered `token` the owner of this session's runs; returns the key."""
        if not (MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS) or not token.isascii():
            raise ConfigError("invalid browser token.")
        key = "b:" + hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            self._session_owners[session_hash] = key
        return key

    def claim(self, name: str, owner: str | None) -> None:
        """Record who owns the model `name` (None: the operator's, visible to all)."""
        with self._lock:
            if owner is None:
                self._run_owners.pop(name, None)
            else:
                self._run_owners[name] = owner

    def forget(self, name: str) -> None:
        """The model `name` is gone (pruned)."""
        with self._lock:
            self._run_owners.pop(name, None)

    def may_use(self, name: str, owner: str) -> bool:
        """True when `owner` may list, select, serve and download the model `name`."""
        with self._lock:
            run_owner = self._run_owners.get(name)
        return run_owner is None or self.share_runs or run_owner == owner

    def visible(self, names: Iterable[str], owner: str) -> list[str]:
        """The models of `names` that `owner` may use, in order."""
        return [name for name in names if self.may_use(name, owner)]

    def check(self, name: str, owner: str, known: Iterable[str]) -> str:
        """`name` when `owner` may use it and it is served; otherwise the one refusal."""
        if name not in set(known) or not self.may_use(name, owner):
            raise not_yours("model", name)
        return name

    def use(self, session_hash: str, name: str) -> None:
        """Session `session_hash` now uses `name`: pruning keeps it until the session ends."""
        with self._lock:
            self._in_use[session_hash] = (name, time.monotonic())

    def release(self, session_hash: str) -> None:
        """The session ended (page closed, or its state expired): its model may be pruned again."""
        with self._lock:
            self._in_use.pop(session_hash, None)
            self._session_owners.pop(session_hash, None)

    def in_use(self) -> set[str]:
        """Models some live session selected (selections older than the TTL are dropped)."""
        now = time.monotonic()
        with self._lock:
            expired = [s for s, (_, at) in self._in_use.items() if now - at > self.session_ttl_s]
            for session in expired:
                del self._in_use[session]
            return {name for name, _ in self._in_use.values()}
