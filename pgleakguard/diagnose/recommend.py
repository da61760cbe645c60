"""A safe max_connections from the machine's memory, with every step of the arithmetic.

Memory a server needs besides connections: shared_buffers, the OS and its page cache,
autovacuum workers and background workers. What is left, divided by what one connection
may use (work_mem times hash_mem_multiplier, plus the backend itself), is the most
connections the machine can hold without swapping or the OOM killer.
"""

from __future__ import annotations

import dataclasses
import math

from .model import ServerSettings
from .units import GIB, MIB, format_size, pg_size

#: Private memory of one backend besides work_mem (catalog caches, plan, buffers): ~10 MiB.
BACKEND_OVERHEAD = 10 * MIB
DEFAULT_WORK_MEM = 4 * MIB
DEFAULT_MAINTENANCE_WORK_MEM = 64 * MIB
#: The largest pool per application process recommend and diagnose advise: about what one
#: PostgreSQL server runs at once; more connections per process only queue.
MAX_POOL = 20


@dataclasses.dataclass(frozen=True)
class Step:
    """One line of the arithmetic: ``name = formula = value``."""

    name: str
    formula: str
    value: str
    #: The number behind ``value`` (bytes or a count), for JSON.
    number: float


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """The result: the steps, the settings to use and the pool sizes that follow."""

    ram: int
    instances: int
    steps: list[Step]
    max_connections: int
    reserved: int
    usable: int
    pool_per_instance: int
    pgbouncer_pool_size: int
    pgbouncer_max_db_connections: int
    pgbouncer_max_client_conn: int
    #: postgresql.conf lines (name -> value).
    conf: dict[str, str]
    #: What came from the server rather than from defaults.
    from_server: tuple[str, ...]
    notes: list[str]


class TooLittleMemory(ValueError):
    """The memory given leaves nothing for connections."""


#: The fewest max_connections recommended whatever the memory: fewer slots would themselves
#: cause "too many clients" (an application pool, admin, monitoring and migrations need them).
MIN_CONNECTIONS = 25
#: A server's shared_buffers below this share of RAM is treated as not tuned (the default
#: 128MB on a large machine) and 25% of RAM is recommended instead.
_SHARED_BUFFERS_TOO_SMALL = 1 / 8


def recommend(
    ram: int,
    settings: ServerSettings | None = None,
    *,
    instances: int = 1,
    cpus: int | None = None,
    work_mem: int | None = None,
    shared_buffers: int | None = None,
) -> Recommendation:
    """Work out a safe max_connections for ``ram`` bytes.

    ``settings`` (read from a server) supply shared_buffers (kept unless below 1/8 of the
    RAM, e.g. the 128MB default), work_mem, hash_mem_multiplier, autovacuum and worker
    settings; explicit ``work_mem`` / ``shared_buffers`` win. Autovacuum workers are counted
    with the maintenance_work_mem recommended here (what they will use once it is applied)
    unless the server sets autovacuum_work_mem.
    """
    s = settings or ServerSettings()
    used: list[str] = []
    notes: list[str] = []

    def pick(name: str, given: int | None, default: int) -> int:
        if given is not None:
            return given
        value = s.size(name)
        if value is not None:
            used.append(name)
            return value
        return default

    steps: list[Step] = []
    sb, sb_how = _shared_buffers(ram, s, shared_buffers, used, notes)
    steps.append(Step("shared_buffers", sb_how, format_size(sb), sb))
    os_reserve = ram // 4
    steps.append(
        Step(
            "OS and page cache",
            "25% of RAM (kernel, page cache)",
            format_size(os_reserve),
            os_reserve,
        )
    )
    av_workers = _int(s, "autovacuum_max_workers", 3, used)
    maintenance_mem = min(max(ram // 16, DEFAULT_MAINTENANCE_WORK_MEM), 2 * GIB)
    av_mem = s.size("autovacuum_work_mem")
    if av_mem is not None:
        used.append("autovacuum_work_mem")
        av_name = "autovacuum_work_mem"
    else:
        av_mem, av_name = maintenance_mem, "maintenance_work_mem"
    maintenance = av_workers * av_mem
    steps.append(
        Step(
            "autovacuum",
            f"autovacuum_max_workers {av_workers} x {av_name} {format_size(av_mem)}",
            format_size(maintenance),
            maintenance,
        )
    )
    wm = pick("work_mem", work_mem, DEFAULT_WORK_MEM)
    workers = _int(s, "max_worker_processes", 8, used)
    worker_mem = workers * (wm + BACKEND_OVERHEAD)
    steps.append(
        Step(
            "background workers",
            f"max_worker_processes {workers} x (work_mem {format_size(wm)} + "
            f"{format_size(BACKEND_OVERHEAD)})",
            format_size(worker_mem),
            worker_mem,
        )
    )
    left = ram - sb - os_reserve - maintenance - worker_mem
    steps.append(
        Step(
            "left for connections",
            "RAM - shared_buffers - OS and page cache - autovacuum - background workers",
            format_size(max(left, 0)),
            left,
        )
    )
    if left <= 0:
        raise TooLittleMemory(
            f"{format_size(ram)} of RAM leaves nothing for connections after shared_buffers "
            f"{format_size(sb)}, the OS reserve and workers"
        )
    hash_mult = _float(s, "hash_mem_multiplier", 2.0, used)
    per_conn = int(wm * hash_mult) + BACKEND_OVERHEAD
    steps.append(
        Step(
            "per connection",
            f"work_mem {format_size(wm)} x hash_mem_multiplier {hash_mult:g} + backend "
            f"{format_size(BACKEND_OVERHEAD)}",
            format_size(per_conn),
            per_conn,
        )
    )
    by_memory = left // per_conn
    max_conn = max(MIN_CONNECTIONS, by_memory)
    how = "left for connections / per connection, rounded down"
    if by_memory < MIN_CONNECTIONS:
        how = f"{by_memory} by memory, raised to the floor of {MIN_CONNECTIONS}"
        notes.append(
            f"The memory gives only {by_memory} connections: that estimate is the worst case "
            "of every connection sorting and hashing at once. Fewer than "
            f"{MIN_CONNECTIONS} slots would themselves cause 'too many clients' (the "
            f"application's pool, admin, monitoring and migrations need them), so "
            f"max_connections is {MIN_CONNECTIONS}: keep work_mem at {pg_size(wm)} or lower, "
            "pools small, and put PgBouncer in front."
        )
    steps.append(Step("max_connections", how, str(max_conn), max_conn))
    reserved = _int(s, "superuser_reserved_connections", 3, used) + _int(
        s, "reserved_connections", 0, used
    )
    usable = max(1, max_conn - reserved)
    steps.append(
        Step(
            "usable by applications", f"max_connections - {reserved} reserved", str(usable), usable
        )
    )
    per_instance = max(1, min(MAX_POOL, math.floor(0.9 * usable / instances)))
    steps.append(
        Step(
            "pool per app instance",
            f"min({MAX_POOL}, 90% of usable / {instances} instance(s)); 10% for admin, "
            "migrations, cron",
            str(per_instance),
            per_instance,
        )
    )
    bouncer_db = max(1, math.floor(0.8 * usable))
    steps.append(Step("PgBouncer max_db_connections", "80% of usable", str(bouncer_db), bouncer_db))
    want = 2 * cpus if cpus else MAX_POOL
    bouncer_pool = min(bouncer_db, want)
    steps.append(
        Step(
            "PgBouncer default_pool_size",
            f"min(max_db_connections, {'2 x ' + str(cpus) + ' CPUs' if cpus else MAX_POOL})",
            str(bouncer_pool),
            bouncer_pool,
        )
    )
    clients = max(100, math.ceil(instances * max(per_instance, 10) / 100) * 100)
    notes += [
        f"Active connections beyond a few per CPU core only queue inside PostgreSQL: a pool "
        f"of more than {MAX_POOL} per application process rarely helps (diagnose advises the "
        "same); put PgBouncer in front rather than raising max_connections to the memory "
        "limit.",
        "The estimate assumes one sort or hash per query; reporting queries with many such "
        "nodes, or a larger work_mem for some roles, need more per connection.",
    ]
    current = s.integer("max_connections")
    if current is not None:
        verdict = "within" if current <= max_conn else "ABOVE"
        notes.insert(
            0, f"The server now has max_connections = {current}: {verdict} the safe value."
        )
    conf = {
        "max_connections": str(max_conn),
        "shared_buffers": pg_size(sb),
        "effective_cache_size": pg_size(ram * 3 // 4),
        "work_mem": pg_size(wm),
        "maintenance_work_mem": pg_size(maintenance_mem),
    }
    return Recommendation(
        ram=ram,
        instances=instances,
        steps=steps,
        max_connections=max_conn,
        reserved=reserved,
        usable=usable,
        pool_per_instance=per_instance,
        pgbouncer_pool_size=bouncer_pool,
        pgbouncer_max_db_connections=bouncer_db,
        pgbouncer_max_client_conn=clients,
        conf=conf,
        from_server=tuple(dict.fromkeys(used)),
        notes=notes,
    )


def _shared_buffers(
    ram: int, s: ServerSettings, given: int | None, used: list[str], notes: list[str]
) -> tuple[int, str]:
    """shared_buffers and how it was chosen: given; the server's unless too small; 25%."""
    if given is not None:
        return given, "given"
    current = s.size("shared_buffers")
    if current is None:
        return ram // 4, "25% of RAM"
    used.append("shared_buffers")
    if current >= ram * _SHARED_BUFFERS_TOO_SMALL:
        return current, "from the server"
    notes.append(
        f"The server has shared_buffers = {format_size(current)}, too small for "
        f"{format_size(ram)} of RAM: set it to {pg_size(ram // 4)} (25% of RAM; needs a "
        "restart)."
    )
    return ram // 4, f"25% of RAM (the server's {format_size(current)} is too small)"


def _int(s: ServerSettings, name: str, default: int, used: list[str]) -> int:
    value = s.integer(name)
    if value is None:
        return default
    used.append(name)
    return value


def _float(s: ServerSettings, name: str, default: float, used: list[str]) -> float:
    setting = s.values.get(name)
    try:
        value = float(setting.value) if setting is not None else None
    except ValueError:
        value = None
    if value is None:
        return default
    used.append(name)
    return value
