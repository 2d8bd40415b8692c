"""Observable names: a (nested) pytree of arrays flattened to `{"a/b": leaf}` and back, with
the escaping that keeps `{"a/b": x}` and `{"a": {"b": y}}` two names. A leaf module shared by
`Trajectory`'s files, its exports, the figures, certify's comparison and sweeps."""

import numpy as np

from ._errors import InputError


def escape(key) -> str:
    """One level of an observable's name as it appears in a flattened name: `/` joins levels,
    so a `/` (and the escape character `%`) inside a key is percent-encoded: `{"a/b": x}` and
    `{"a": {"b": y}}` stay two observables, `a%2Fb` and `a/b`."""
    return str(key).replace("%", "%25").replace("/", "%2F")


def unescape(part: str) -> str:
    return part.replace("%2F", "/").replace("%2f", "/").replace("%25", "%")


def flat_names(tree) -> dict[str, np.ndarray]:
    """`{"a/b": leaf}` for a (nested) dict or other pytree of arrays (keys escaped, see
    `escape`); two leaves of one name are an `InputError`."""
    flat: dict[str, np.ndarray] = {}

    def put(name: str, value) -> None:
        if name in flat:
            raise InputError(f"two observables are both named {name!r} once flattened: "
                             "rename one")
        flat[name] = value

    if nested_dicts_of_arrays(tree):
        # A loaded run's observables, without JAX; other pytrees need it.
        for key, value in tree.items():
            if isinstance(value, dict):
                for k, v in flat_names(value).items():
                    put(f"{escape(key)}/{k}", v)
            else:
                put(escape(key), np.asarray(value))
        return flat
    import jax.tree_util as jtu

    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(escape(getattr(key, attr)))
                    break
        put("/".join(parts), np.asarray(leaf))
    return flat


def nested_dicts_of_arrays(tree) -> bool:
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        return False
    return all(nested_dicts_of_arrays(v) if isinstance(v, dict)
               else isinstance(v, (np.ndarray, np.generic, float, int)) for v in tree.values())
