"""The optimizers `make bench` puts side by side, each found at run time.

A contender that cannot be imported (a peer that is not installed, an eightbit optimizer that
does not exist yet) is still listed, with the reason in ``missing``, so the table shows
"not installed" rather than the run failing. The baseline for every ratio is torch's fused Adam.

eightbit's fused CPU kernels have two codebook searches (issue 21): AVX-512 VBMI byte permutes
and the portable path. Where the CPU has VBMI, each eightbit optimizer runs twice, as
"eightbit X (VBMI)" and as its twin "eightbit X (portable)", with ``EIGHTBIT_CPU_PATH`` set
around each step; elsewhere once, as "eightbit X (portable)".
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import os
import warnings
from collections.abc import Callable

import torch

BASELINE = "torch Adam fused"
EIGHTBIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "RMSprop8bit", "Lion8bit")
TORCH_PATH = (("EIGHTBIT_CPU_BACKEND", "torch"),)  # eightbit's switch to its eager torch path
PATH_ENV = "EIGHTBIT_CPU_PATH"  # eightbit's switch between its CPU kernels' codebook searches
VBMI, PORTABLE = "VBMI", "portable"


@dataclasses.dataclass(frozen=True)
class Contender:
    """One optimizer configuration: how to build it over a list of parameters and step it.

    ``make(params)`` returns the optimizer; ``step(optimizer)`` runs one ``optimizer.step()``
    (inside ``torch.compiler.set_stance("force_eager")`` for ``eager_stance`` contenders, which
    turns a peer's internal ``torch.compile`` into plain eager execution, and with the
    environment variables of ``env`` set for its duration).
    """

    name: str
    family: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None
    missing: str | None = None
    eager_stance: bool = False
    compiles: bool = False
    env: tuple[tuple[str, str], ...] = ()
    cpu_path: str | None = None  # VBMI or PORTABLE for eightbit's fused kernels
    twin: bool = False  # a second path of an optimizer listed before it: the same state

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        with contextlib.ExitStack() as stack:
            if self.eager_stance:
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            if self.env:
                stack.enter_context(environ(dict(self.env)))
            optimizer.step()


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """Set the environment variables ``values`` for the duration; restore them after, even on
    error (a variable that was unset is removed again)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def on_env(values: dict[str, str], fn):
    """``fn`` made to run with the environment ``values`` set around each call (:func:`environ`)."""
    def run():
        with environ(values):
            return fn()

    return run


def quiet_import(module: str):
    """Import ``module`` with its import-time chatter (warnings, log lines, prints) silenced.

    Returns ``(module, None)``, or ``(None, reason)`` when it cannot be imported.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(module), None
    except ImportError as error:
        if error.name and module.startswith(error.name):
            return None, "not installed"
        return None, f"import failed: {error}"
    except Exception as error:  # a broken install shows in the table, it does not stop the run
        return None, f"import failed: {type(error).__name__}: {error}"
    finally:
        logging.disable(previous)


def version_of(module: str) -> str:
    """The installed version of ``module``, or "not installed"."""
    mod, why = quiet_import(module)
    return getattr(mod, "__version__", "?") if mod is not None else why


def _torch_contenders() -> list[Contender]:
    return [
        Contender(BASELINE, "torch", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        Contender("torch Adam foreach", "torch", lambda ps: torch.optim.Adam(ps, foreach=True)),
        Contender("torch AdamW fused", "torch", lambda ps: torch.optim.AdamW(ps, fused=True)),
    ]


def cpu_paths() -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """The fused CPU paths this machine can time, fastest first, each with the environment
    that selects it: VBMI then portable where the kernels may use VBMI, else portable only;
    none when the kernels do not serve CPU tensors (then eightbit runs its torch path)."""
    try:
        from eightbit.quant import _native, _vbmi

        if _native.kernels() is None:
            return []
        has_vbmi = _vbmi.in_use()
    except (ImportError, ValueError):  # no numba, an older eightbit, or a bad setting
        return []
    portable = (PORTABLE, ((PATH_ENV, "portable"),))
    return [(VBMI, ((PATH_ENV, "vbmi"),)), portable] if has_vbmi else [portable]


def path_name(name: str, cpu_path: str | None) -> str:
    """The name of ``name``'s row on ``cpu_path``: "eightbit Adam8bit (portable)"."""
    return f"{name} ({cpu_path})" if cpu_path else name


def _eightbit_contenders() -> list[Contender]:
    optim, why = quiet_import("eightbit.optim")
    paths = cpu_paths() if optim is not None else []
    rows = []
    for name in EIGHTBIT_OPTIMIZERS:
        cls = getattr(optim, name, None) if optim is not None else None
        missing = why if optim is None else None if cls is not None else "not in eightbit.optim yet"
        base = Contender(f"eightbit {name}", "eightbit", cls, missing)
        rows += [dataclasses.replace(base, name=path_name(base.name, path), env=env,
                                     cpu_path=path, twin=k > 0)
                 for k, (path, env) in enumerate(paths)] or [base]
    # The same Adam8bit on its eager torch path (the fallback without numba), to show what the
    # fused CPU kernels gain.
    rows.append(Contender("eightbit Adam8bit (torch path)", "eightbit", rows[0].make,
                          rows[0].missing, env=TORCH_PATH))
    return rows


def _bitsandbytes_contenders() -> list[Contender]:
    bnb, why = quiet_import("bitsandbytes")
    cls = getattr(getattr(bnb, "optim", None), "Adam8bit", None)
    if bnb is not None and cls is None:
        why = f"bitsandbytes {bnb.__version__} has no CPU Adam8bit (needs >= 0.50)"
    return [Contender("bitsandbytes Adam8bit", "bitsandbytes", cls, None if cls else why)]


def _torchao_contenders() -> list[Contender]:
    ao_optim, why = quiet_import("torchao.optim")
    cls = getattr(ao_optim, "AdamW8bit", None)
    if ao_optim is not None and cls is None:
        why = "this torchao has no torchao.optim.AdamW8bit"
    # torchao compiles its per-parameter step with torch.compile inside step(); the eager row
    # runs that same code with compilation switched off.
    why = None if cls else why
    return [
        Contender("torchao AdamW8bit eager", "torchao", cls, why, eager_stance=True),
        Contender("torchao AdamW8bit compiled", "torchao", cls, why, compiles=True),
    ]


_FAMILIES = {
    "torch": _torch_contenders,
    "eightbit": _eightbit_contenders,
    "bitsandbytes": _bitsandbytes_contenders,
    "torchao": _torchao_contenders,
}


def all_contenders(family: str | None = None) -> list[Contender]:
    """Every contender (of ``family`` only, if given: then only that library is imported),
    baseline first; unavailable ones carry the reason in ``missing``."""
    if family is not None:
        return _FAMILIES[family]()
    return [c for build in _FAMILIES.values() for c in build()]


def select(contenders: list[Contender], patterns: list[str] | None) -> list[Contender]:
    """The contenders whose name contains one of ``patterns`` (case-insensitive); the baseline
    always stays, since every ratio is taken against it."""
    if not patterns:
        return contenders
    wanted = [p.lower() for p in patterns]
    chosen = [c for c in contenders
              if c.name == BASELINE or any(w in c.name.lower() for w in wanted)]
    if len(chosen) == 1 and len(contenders) > 1:
        names = ", ".join(c.name for c in contenders)
        raise SystemExit(f"--only {patterns} matches no contender; names are: {names}")
    return chosen
