"""The quantized topology of a model: which layers quantize their weights, where activations are quantized, and
what stays full precision. The harness owns it, so two methods in one table quantize the same network and differ
only in their quantizers, batch-norm handling, branches and training (docs/fairness.md).

One rule for every model of :mod:`harness.models` (:func:`declare_topology`):

* a **site** is every ``nn.Conv2d`` and ``nn.Linear`` of the full-precision model;
* the first convolution (role ``"stem"``, e.g. a ViT's patch embedding) and the classifier (role ``"head"``)
  keep full-precision weights and read a full-precision input;
* every other site quantizes its weights **and its input**: the activation quantizer sits at the input of the
  layer that reads the activation (He et al.'s post-activation blocks and the pre-activation blocks of
  Any-Precision DNNs then quantize the same tensors; MBQuant and AdaBits place their quantizers there too);
* full precision everywhere else: the input normalization, ReLUs (a plain ReLU, never a clamp), the residual
  stream (the sum of a block and its shortcut, and the ReLU after it), pooling, layer norms. Batch norm stays a
  batch norm; how many a method keeps per bit-width is the method's semantics.

A method that needs something else declares a **departure** (:meth:`Topology.depart`): a named config option,
off by default, recorded in the topology (and so in the run's record) with its reason. Any-Precision's
full-precision 1x1 shortcut (``fp_shortcut``) and AdaBits' quantized first and last layers are departures.

Methods build through :func:`quantize_model`, which swaps every site that quantizes anything for the layer the
method's factory returns, tags it with the site's name (``mbq_site``) and checks that the layer quantizes exactly
what its site declares. Methods with a network of their own (MBQuant's branches) tag their layers with
:func:`tag_sites` against the same declaration. :func:`built_sites` reads any built network back, which is how the
tests compare every method's network site by site.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from harness.errors import ConfigError
from harness.models import BasicBlock, PreActBlock, role_of

FULL_PRECISION_ROLES = ("stem", "head")
#: What every topology keeps in full precision besides its full-precision sites (documentation and records).
FULL_PRECISION_PARTS = ("input normalization", "ReLUs", "residual sums and the ReLU after them", "pooling",
                        "layer norms")


@dataclass(frozen=True)
class Site:
    """A convolution or linear layer of the full-precision model and what quantizing the model does to it."""

    name: str
    kind: str
    role: str
    quantize_weight: bool
    quantize_input: bool

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "linear"):
            raise ValueError(f"site kind must be 'conv' or 'linear', got {self.kind!r}")


@dataclass(frozen=True)
class Topology:
    """Every site of one model, its residual blocks, and the departures a method declared."""

    model: str
    sites: tuple[Site, ...]
    blocks: tuple[str, ...] = ()
    departures: tuple[str, ...] = ()

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)

    @property
    def weight_sites(self) -> tuple[str, ...]:
        """Names of the layers whose weights are quantized, in the model's order."""
        return tuple(s.name for s in self.sites if s.quantize_weight)

    @property
    def input_sites(self) -> tuple[str, ...]:
        """Names of the layers whose input activation is quantized, in the model's order."""
        return tuple(s.name for s in self.sites if s.quantize_input)

    def depart(self, reason: str, *, roles: Iterable[str], quantize_weight: bool | None = None,
               quantize_input: bool | None = None) -> Topology:
        """A copy where the sites of ``roles`` quantize as given (None: unchanged), with ``reason`` recorded."""
        roles = tuple(roles)
        changes = {key: value for key, value in (("quantize_weight", quantize_weight),
                                                 ("quantize_input", quantize_input)) if value is not None}
        sites = tuple(dataclasses.replace(s, **changes) if s.role in roles else s for s in self.sites)
        return dataclasses.replace(self, sites=sites, departures=self.departures + (reason,))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "weight_sites": list(self.weight_sites), "input_sites": list(self.input_sites),
                "full_precision_sites": [s.name for s in self.sites if not (s.quantize_weight or s.quantize_input)],
                "full_precision": list(FULL_PRECISION_PARTS), "departures": list(self.departures)}


def is_residual_block(module: nn.Module) -> bool:
    """The harness's ResNet blocks and timm's transformer blocks (their output is the residual stream)."""
    if isinstance(module, (BasicBlock, PreActBlock)):
        return True
    return type(module).__name__ == "Block" and type(module).__module__.startswith("timm.")


def site_role(module: nn.Module) -> str:
    role = role_of(module)
    return role if role in ("stem", "head", "shortcut") else "body"


def declare_topology(model: nn.Module, model_name: str | None = None) -> Topology:
    """The harness's quantized topology of a full-precision model from :mod:`harness.models` (module docstring)."""
    sites = []
    blocks = []
    for name, module in model.named_modules():
        if is_residual_block(module):
            blocks.append(name)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            role = site_role(module)
            quantized = role not in FULL_PRECISION_ROLES
            sites.append(Site(name, "conv" if isinstance(module, nn.Conv2d) else "linear", role, quantized, quantized))
    if not any(s.role == "stem" for s in sites) or not any(s.role == "head" for s in sites):
        raise ConfigError(f"model {model_name or type(model).__name__} tags no stem or head layer; "
                          f"a quantized topology needs both (see harness.models.tag)")
    return Topology(model_name or type(model).__name__, tuple(sites), tuple(blocks))


def layer_quantizes(module: nn.Module) -> tuple[bool, bool]:
    """(weights quantized, input quantized) as the layer itself declares it; plain layers quantize nothing."""
    return bool(getattr(module, "quantizes_weight", False)), bool(getattr(module, "quantizes_input", False))


LayerFactory = Callable[[nn.Module, Site], nn.Module]
NormFactory = Callable[[nn.BatchNorm2d], nn.Module]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, topology: Topology, *, layer: LayerFactory,
                   norm: NormFactory | None = None) -> nn.Module:
    """Quantize ``model`` in place as ``topology`` declares and return it.

    ``layer(module, site)`` is called for every site that quantizes its weights or its input and must return a
    layer that does exactly that (checked). ``norm(bn)``, if given, replaces every ``BatchNorm2d`` (the method's
    per-bit-width batch norm). Sites that stay full precision keep their module. Every site and block is tagged
    with its name (``mbq_site``, ``mbq_block``) and the model carries the topology (``mbq_topology``).
    """
    modules = dict(model.named_modules())
    for site in topology.sites:
        if site.name not in modules:
            raise ConfigError(f"topology of {topology.model} names {site.name!r}, which the model does not have")
        original = modules[site.name]
        new = layer(original, site) if site.quantize_weight or site.quantize_input else original
        if layer_quantizes(new) != (site.quantize_weight, site.quantize_input):
            raise ConfigError(f"{type(new).__name__} at {site.name} quantizes (weights, input) = "
                              f"{layer_quantizes(new)}, its site declares "
                              f"{(site.quantize_weight, site.quantize_input)}")
        new.mbq_site = site.name
        if new is not original:
            _replace(model, site.name, new)
    if norm is not None:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.BatchNorm2d):
                _replace(model, name, norm(module))
    for name in topology.blocks:
        model.get_submodule(name).mbq_block = name
    model.mbq_topology = topology
    return model


def tag_sites(topology: Topology, layers: Sequence[tuple[str, nn.Module]], *, check: Callable[[Site, nn.Module],
              str | None] | None = None) -> None:
    """Tag the layers of a network a method builds itself with the sites of ``topology``, in order.

    ``layers`` lists (site role, layer) in the network's order; the i-th layer of a role gets the i-th site of that
    role's name. ``check(site, layer)`` may return a reason why they do not correspond (a shape mismatch). Each
    layer must quantize what its site declares.
    """
    by_role: dict[str, list[Site]] = {}
    for site in topology.sites:
        by_role.setdefault(site.role, []).append(site)
    counts: dict[str, int] = {}
    for role, module in layers:
        index = counts.get(role, 0)
        counts[role] = index + 1
        candidates = by_role.get(role, [])
        if index >= len(candidates):
            raise ConfigError(f"the network has more {role} layers than the topology of {topology.model}")
        site = candidates[index]
        problem = check(site, module) if check else None
        if problem:
            raise ConfigError(f"{type(module).__name__} does not correspond to site {site.name}: {problem}")
        if layer_quantizes(module) != (site.quantize_weight, site.quantize_input):
            raise ConfigError(f"{type(module).__name__} for site {site.name} quantizes (weights, input) = "
                              f"{layer_quantizes(module)}, the site declares "
                              f"{(site.quantize_weight, site.quantize_input)}")
        module.mbq_site = site.name
    missing = {role: len(sites) - counts.get(role, 0) for role, sites in by_role.items()
               if counts.get(role, 0) != len(sites)}
    if missing:
        raise ConfigError(f"the network lacks sites of the topology of {topology.model}: {missing}")


def tag_blocks(topology: Topology, blocks: Sequence[nn.Module]) -> None:
    """Tag a method's own residual blocks with the topology's block names, in order."""
    if len(blocks) != len(topology.blocks):
        raise ConfigError(f"the network has {len(blocks)} residual blocks, the topology of {topology.model} "
                          f"{len(topology.blocks)}")
    for name, block in zip(topology.blocks, blocks):
        block.mbq_block = name


def built_sites(model: nn.Module) -> dict[str, tuple[bool, bool]]:
    """Site name -> (weights quantized, input quantized) of a built network, read from the layers themselves.

    A network that holds several copies of a site (one network per bit-width) must quantize them alike.
    """
    found: dict[str, tuple[bool, bool]] = {}
    for module in model.modules():
        name = getattr(module, "mbq_site", None)
        if name is None:
            continue
        flags = layer_quantizes(module)
        if found.setdefault(name, flags) != flags:
            raise ConfigError(f"two layers of site {name} quantize differently: {found[name]} and {flags}")
    return found


def built_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Block name -> the block modules carrying it (several when a model holds one network per bit-width)."""
    blocks: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        name = getattr(module, "mbq_block", None)
        if name is not None:
            blocks.setdefault(name, []).append(module)
    return blocks
