"""Does the train step fit in device memory? Checked from XLA's own estimate of the compiled step,
before the first batch is read, so a batch that is too big fails in seconds with what to change
rather than after minutes with a RESOURCE_EXHAUSTED traceback; an out-of-memory error that still
happens at run time is reported the same way."""

from __future__ import annotations

import jax

from sparsetrain.errors import InputError

# The config fields that trade memory for time or batch, named in every out-of-memory message.
REMEDIES = ("lower data.batch_size, raise trainer.grad_accum (microbatches per step), set model.remat=full "
            "(or dots), or set trainer.loss_chunk (e.g. 4096) to chunk the output head")


class OutOfMemory(InputError):
    """The step needs more device memory than there is."""


def device_memory_limit(override: int = 0) -> int | None:
    """Bytes one device may use: `override` if set (trainer.memory_limit_bytes), else what the device
    reports (GPUs do; CPUs report nothing, so None: no check)."""
    if override:
        return override
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def estimated_bytes(compiled: jax.stages.Compiled) -> int | None:
    """Peak bytes per device XLA plans for the step: arguments and outputs (donated ones counted once),
    temporaries and code. None when the backend gives no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)


def check_fits(compiled: jax.stages.Compiled, limit_override: int = 0) -> None:
    """Raise OutOfMemory when the compiled step's estimate exceeds the device's memory limit."""
    limit, needed = device_memory_limit(limit_override), estimated_bytes(compiled)
    if limit is None or needed is None or needed <= limit:
        return
    source = "trainer.memory_limit_bytes" if limit_override else "the device's limit"
    raise OutOfMemory(f"the train step needs about {_gib(needed)} per device (XLA's estimate of the "
                      f"compiled step) but {source} is {_gib(limit)}: {REMEDIES}")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def out_of_memory(error: BaseException, step: int) -> OutOfMemory:
    """The one-line report of an out-of-memory error raised while running `step`."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return OutOfMemory(f"out of device memory at step {step} ({first[:200]}): {REMEDIES}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"
