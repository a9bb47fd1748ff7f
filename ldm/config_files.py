"""Configs read from files: YAML files, a training checkpoint's `config` entry, the YAML in a
.safetensors file's metadata. Such a config may come from someone else, so it is data:

- bounded before OmegaConf sees it: at most MAX_CONFIG_BYTES of text and MAX_CONFIG_NODES nodes
  counted as OmegaConf would expand them (YAML aliases and shared references in a pickle can
  make a few hundred bytes expand exponentially);
- no interpolations (`${...}`): resolving `${oc.env:SECRET}` would read the environment into the
  run's files and into exported checkpoints, so a config carrying one is refused;
- plain values only (mappings, lists, strings, numbers, booleans, null).

Which classes a config may build is `ldm.util.instantiate_from_config`'s rule.
"""

from collections.abc import Mapping
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.util import ConfigError

MAX_CONFIG_BYTES = 2**20  # an SD config is about 3 KB, a training config about 5 KB
MAX_CONFIG_NODES = 10_000  # an SD training config has about 300
_SCALARS = (str, int, float, bool, type(None))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_scalar(value: object, where: str, key: str) -> None:
    if isinstance(value, str) and "${" in value:
        raise ConfigError(
            f"{where}: {key or 'a value'} holds an interpolation ({value[:60]!r}); configs read "
            "from files may not use them (one could read environment variables into the run's "
            "files): write the value, or set it with key=value on the command line"
        )


def _size(node: object) -> int | None:
    """How many children (keys and values) a container has; None for a scalar."""
    if isinstance(node, (yaml.MappingNode, Mapping)):
        return 2 * len(node.value if isinstance(node, yaml.Node) else node)
    if isinstance(node, (yaml.SequenceNode, list, tuple)):
        return len(node.value if isinstance(node, yaml.Node) else node)
    return None


def _children(node: object, key: str) -> list[tuple[object, str]]:
    """A container's (child, key path) pairs, keys included: YAML nodes or plain containers."""
    if isinstance(node, yaml.MappingNode):
        pairs = [(k, k.value, v) for k, v in node.value]
    elif isinstance(node, Mapping):
        pairs = [(k, k, v) for k, v in node.items()]
    else:
        values = node.value if isinstance(node, yaml.Node) else node
        return [(v, f"{key}[{i}]") for i, v in enumerate(values)]
    return [item for k, name, v in pairs for item in ((k, key), (v, f"{key}.{name}".strip(".")))]


def _check_tree(root: object, where: str) -> None:
    """Walk `root` (YAML nodes or plain containers) as OmegaConf would expand it, within a
    budget: a shared node counts each time it appears."""
    stack, nodes, size = [(root, "")], 1, 0
    while stack:
        node, key = stack.pop()
        count = _size(node)
        if count is not None:
            nodes += count
            if nodes > MAX_CONFIG_NODES:
                raise ConfigError(
                    f"{where}: more than {MAX_CONFIG_NODES} config nodes (shared or aliased "
                    "parts count each time they appear); refused"
                )
            stack.extend(_children(node, key))
            continue
        value = node.value if isinstance(node, yaml.ScalarNode) else node
        if not isinstance(value, _SCALARS):
            raise ConfigError(f"{where}: {key or 'the config'} is a {type(value).__name__}")
        size += len(value) if isinstance(value, str) else 8
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where}: config larger than {MAX_CONFIG_BYTES} bytes; refused")
        _check_scalar(value, where, key)


def _create(value: object, where: str) -> DictConfig:
    try:
        config = OmegaConf.create(value)
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: {_one_line(e)}") from None
    if not isinstance(config, DictConfig):
        raise ConfigError(f"{where}: not a mapping of config keys")
    return config


def config_from_text(text: str, where: str) -> DictConfig:
    """A config from YAML text (a file's, or a .safetensors file's `config` metadata)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: config larger than {MAX_CONFIG_BYTES} bytes; refused")
    try:
        # Nodes only, not objects: an alias stays one shared node, however often it is used.
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not YAML ({_one_line(e)})") from None
    if root is None:  # an empty document
        return OmegaConf.create({})
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{where}: not a mapping of config keys")
    _check_tree(root, where)
    return _create(text, where)


def config_from_data(value: object, where: str) -> DictConfig:
    """A config stored in a file: YAML text, or (a checkpoint's `config`) nested containers."""
    if isinstance(value, str):
        return config_from_text(value, where)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: not a mapping of config keys ({type(value).__name__})")
    _check_tree(value, where)
    return _create(value, where)


def read_config_file(path: str | Path) -> DictConfig:
    """A YAML config file (`-b`, `--config`), under the same rules as any file-borne config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config larger than {MAX_CONFIG_BYTES} bytes; refused")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({_one_line(e)})") from None
    return config_from_text(text, str(path))
