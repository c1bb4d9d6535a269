"""The Redis contract in one room: connections, key names, the Lua scripts with their typed
calls and replies, the records stored under the keys, and the Redis users. It imports nothing
of dagkube but itself and :mod:`dagkube.errors`; the runtime, the metrics, the CLI and the
operator build on it."""
