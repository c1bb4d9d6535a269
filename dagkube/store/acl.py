"""Redis ACL users: least privilege for the operator and for the workers of each namespace.

A worker of namespace N gets a user of its own, ``dagkube-worker-N``: the keys under
``dk:ns:N:`` only (:func:`dagkube.store.keys.namespace_pattern`) and only the commands the
worker sends, itself and inside the scripts it calls. The operator's user may touch every
``dk:`` key with the commands the operator, its scaler and its exporter send, and create,
change and delete users (that is how it hands out worker users). See docs/architecture.md,
"Key space and Redis users", and SECURITY.md.

Rules are computed here as plain data and applied with one ``ACL SETUSER ... reset ...``, so
applying them again (a restarted operator, a new version whose scripts use another command)
leaves the user exactly as computed: idempotent, with the passwords given (several during a
rotation).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from dagkube.store.keys import check_namespace, namespace_pattern
from dagkube.store.scripts import SOURCES, WORKER_SCRIPTS

OPERATOR_USER = "dagkube-operator"
WORKER_USER_PREFIX = "dagkube-worker-"

# Commands a client sends whatever it does: PING (connect, health checks), transactions
# (pipelines with transaction=True), scripts by SHA and loading them again after a Redis
# restart emptied the script cache (redis-py does on NOSCRIPT). No EVAL: nothing sends one.
_CLIENT_COMMANDS = ("ping", "multi", "exec", "discard", "evalsha", "script|load")
# Commands the worker sends itself (worker.py, connection.BulkReader), besides its scripts'.
WORKER_COMMANDS = (
    *_CLIENT_COMMANDS,
    "get",
    "set",
    "del",
    "hget",
    "hmget",
    "hset",
    "hsetnx",
    "hdel",
    "hincrby",
    "sadd",
    "srem",
    "smembers",
    "sismember",
    "smismember",
    "lpush",
    "lpop",
    "ltrim",
    "blpop",
    "blmove",
    "zadd",
    "expire",  # a build Pod's keys (dagkube.description.store) live for a while only
)
# Commands the operator sends itself: launching and following runs (launcher), the scaler,
# the Workflow handlers (clean-up, stored DAGs), the history and the /metrics exporter.
OPERATOR_COMMANDS = (
    *_CLIENT_COMMANDS,
    "get",
    "set",
    "type",
    "del",
    "unlink",
    "exists",
    "hget",
    "hmget",
    "hset",
    "hgetall",
    "hkeys",
    "hvals",
    "hexists",
    "sadd",
    "smembers",
    "scard",
    "lpush",
    "rpush",
    "ltrim",
    "lrange",
    "lindex",
    "llen",
    "blpop",
    "blmove",
    "zrange",
    "zrangebyscore",
    "zrem",
    # worker users: created, re-applied (new rules, a password rotation) and removed
    "acl|setuser",
    "acl|getuser",
    "acl|deluser",
)

_SCRIPT_CALL = re.compile(r"redis\.call\(\s*'([A-Za-z]+)'")


def script_commands(script: str) -> set[str]:
    """The commands a Lua script may send (its helpers' too: a superset of one call's)."""
    return {name.lower() for name in _SCRIPT_CALL.findall(script)}


@dataclass(frozen=True)
class AclUser:
    """A Redis user's name and rules (without passwords), as ``ACL SETUSER`` takes them."""

    name: str
    commands: tuple[str, ...]  # allowed commands (``cmd`` or ``cmd|subcommand``), sorted
    key_patterns: tuple[str, ...]

    def rules(self) -> list[str]:
        """Everything but the passwords: no channels, no command but those listed, no key but
        those matching the patterns."""
        return [
            "resetchannels",
            "-@all",
            *(f"+{command}" for command in self.commands),
            *(f"~{pattern}" for pattern in self.key_patterns),
        ]


def _commands(direct: Iterable[str], called: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(direct).union(*(script_commands(s) for s in called))))


def worker_user(namespace: str) -> AclUser:
    """The user of every worker Pod in ``namespace``: its keys (``dk:ns:<namespace>:*``) and
    the worker's commands, nothing else (no KEYS/SCAN, CONFIG, FLUSHALL, DEBUG, ACL, EVAL)."""
    return AclUser(
        name=WORKER_USER_PREFIX + check_namespace(namespace),
        commands=_commands(WORKER_COMMANDS, (SOURCES[name] for name in WORKER_SCRIPTS)),
        key_patterns=(namespace_pattern(namespace),),
    )


def operator_user(name: str = OPERATOR_USER) -> AclUser:
    """The operator's user: every key of the project (``dk:*``: all namespaces, the stored
    DAGs, local runs sharing the Redis), the commands of the operator and of every script,
    and the ACL subcommands that manage worker users. Not CONFIG, FLUSHALL, KEYS, DEBUG."""
    return AclUser(
        name=name,
        commands=_commands(OPERATOR_COMMANDS, SOURCES.values()),
        key_patterns=("dk:*",),
    )


def new_password() -> str:
    """A random password for a Redis user (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def password_hash(password: str) -> str:
    """What Redis keeps of a password (``#<sha256>`` in ACL rules): the password itself never
    needs to be sent when rules are re-applied by someone who only holds the hash."""
    return hashlib.sha256(password.encode()).hexdigest()


async def apply_user(redis: Any, user: AclUser, passwords: Sequence[str]) -> None:
    """Create or re-apply ``user`` with exactly these rules and passwords, in one atomic
    ``ACL SETUSER``: idempotent; a user that had other rules or passwords loses them.

    Rotation without a gap: apply with the old and the new password, move the clients to the
    new one (the Secret, then new Pods), then apply with the new one only. Connections already
    authenticated stay connected and get the new rules at once.
    """
    if not passwords:
        raise ValueError(f"Redis user {user.name!r} needs at least one password")
    await redis.execute_command(
        "ACL",
        "SETUSER",
        user.name,
        "reset",
        "on",
        *(f"#{password_hash(p)}" for p in passwords),
        *user.rules(),
    )


async def delete_user(redis: Any, name: str) -> bool:
    """Remove a user (its connections are closed by Redis); False if there was none."""
    return bool(await redis.execute_command("ACL", "DELUSER", name))


def user_url(url: str, username: str, password: str) -> str:
    """``url`` (a redis:// or rediss:// URL) with these credentials instead of its own, for the
    Secret a namespace's worker Pods read (``DAGKUBE_REDIS_URL``)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def url_password(url: str) -> str:
    """The password in a Redis URL (e.g. a namespace's worker Secret, to re-apply its user)."""
    return unquote(urlsplit(url).password or "")


async def ensure_worker_user(
    redis: Any, url: str, namespace: str, passwords: Sequence[str] = ()
) -> tuple[str, str]:
    """What the operator calls before it starts a namespace's first worker Pod (and again at
    start-up, so that a new version's rules apply): the namespace's worker user with these
    passwords (the Secret's, or during a rotation old and new), or a new random one when none
    is given. Returns (password to hand out: the last given or the new one, the worker URL
    built from the operator's ``url`` with that user and password)."""
    user = worker_user(namespace)
    passwords = list(passwords) or [new_password()]
    await apply_user(redis, user, passwords)
    return passwords[-1], user_url(url, user.name, passwords[-1])


def main() -> None:
    """``python -m dagkube.store.acl``: the operator user's rules on one line, for an ACL
    file (``user dagkube-operator on >PASSWORD <rules>``) or ``ACL SETUSER dagkube-operator
    reset on >PASSWORD <rules>`` on a Redis of your own. The chart's bundled Redis reads the
    same line from charts/dagkube/files/redis-operator-rules.txt (a test keeps them equal)."""
    print(" ".join(operator_user().rules()))


if __name__ == "__main__":
    main()
