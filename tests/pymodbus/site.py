#!/usr/bin/env python3
"""A site simulated with a Modbus TCP server we did not write: pymodbus.

Pinned: pymodbus 3.16.1 (PyPI). Install with:

    python3 -m pip install pymodbus==3.16.1

Used by the interop tests to check that the controller talks to a third-party
Modbus server, not only to our own firmware-sim. One TCP port on 127.0.0.1
acts as a gateway for two unit ids:

  unit 1  power meter
          input registers 0-1  active power, kW, IEEE-754 f32, high word first
                                = base_kw + (sum of outlet powers in W) / 1000
          input registers 2-3  frequency, Hz, f32, high word first (50.0)
  unit 2  PDU with N outlets
          coils 0..N-1          outlet relays, 1 = on (all on at start)
          input register 100+i  outlet i's power, W, u16
                                (rated_w while its relay is on, else 0)
          input registers 200-201  PDU total, W, u32, high word first

Addresses are the zero-based protocol addresses seen on the wire: coil 0 on
the wire is the first outlet.

Anything else is answered with exception 02 (illegal data address): other
input registers, holding registers, discrete inputs, the meter's coils, coils
from N on. One gap, from pymodbus keeping coils in 16-bit words: a coil read
that starts below N but runs past it (e.g. 0..8 with N = 8) is answered, with
0 for the coils past N. A unit id other than 1 and 2 gets exception 04 from
pymodbus 3.16.1 (its lookup fails), with an error logged on stderr.

Protocol on stdout (each line flushed at once; nothing else goes there):

  ready PORT              once, when the server is listening
  write UNIT ADDRESS V,..  after each accepted coil write (FC05 or FC15),
                          one 0/1 value per coil written, e.g. "write 2 0 0,0,1"

The script stops, exit code 0, when its stdin reaches EOF (so the test
harness must give it a pipe) or on SIGTERM / SIGINT. pymodbus' own log goes
to stderr, warnings and above only.

Usage:

    python3 tests/pymodbus/site.py --outlets 8 --rated-w 3000 --base-kw 20
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import struct
import sys
import threading

# The pymodbus release this script was written and checked against. Its
# server API changes between minor releases (3.10 renamed slave= to
# device_id=; 3.12-3.13 moved the server onto SimData/SimDevice and dropped
# the datastore's getValues/setValues hooks), so another major.minor is
# refused rather than half-working.
PYMODBUS_PIN = "3.16.1"


def require_pymodbus() -> None:
    """Exit with code 2 unless the pinned pymodbus major.minor is installed."""
    hint = f"install it with: python3 -m pip install pymodbus=={PYMODBUS_PIN}"
    try:
        import pymodbus  # pylint: disable=import-outside-toplevel
    except ImportError:
        print(f"site.py: pymodbus is not installed; {hint}", file=sys.stderr)
        sys.exit(2)
    found = pymodbus.__version__
    if found.split(".")[:2] != PYMODBUS_PIN.split(".")[:2]:
        print(
            f"site.py: pymodbus {found} is installed but {PYMODBUS_PIN} is "
            f"required (same major.minor); {hint}",
            file=sys.stderr,
        )
        sys.exit(2)


require_pymodbus()

# Imported only once the version is known to be right.
# pylint: disable=wrong-import-position
from pymodbus.constants import ExcCodes  # noqa: E402
from pymodbus.server import ModbusTcpServer  # noqa: E402
from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: E402

METER_UNIT = 1
PDU_UNIT = 2

# Function codes, as pymodbus hands them to a device's action.
FC_READ_COILS = 1
FC_READ_INPUT_REGISTERS = 4
FC_WRITE_SINGLE_COIL = 5
FC_WRITE_MULTIPLE_COILS = 15
COIL_FUNCTIONS = (FC_READ_COILS, FC_WRITE_SINGLE_COIL, FC_WRITE_MULTIPLE_COILS)

# Register map (zero-based protocol addresses).
METER_POWER_KW = 0  # f32, 2 registers
METER_FREQUENCY_HZ = 2  # f32, 2 registers
METER_REGISTERS = 4
PDU_OUTLET_W = 100  # u16 per outlet
PDU_TOTAL_W = 200  # u32, 2 registers
MAX_OUTLETS = PDU_TOTAL_W - PDU_OUTLET_W  # outlet registers must end below 200

FREQUENCY_HZ = 50.0


def emit(line: str) -> None:
    """Write one protocol line to stdout and flush it at once."""
    print(line, flush=True)


def f32_words(value: float) -> list[int]:
    """An IEEE-754 single as two 16-bit registers, high word first."""
    return list(struct.unpack(">HH", struct.pack(">f", value)))


def u32_words(value: int) -> list[int]:
    """An unsigned 32-bit integer as two 16-bit registers, high word first."""
    return [(value >> 16) & 0xFFFF, value & 0xFFFF]


def put(registers: list[int], block_start: int, address: int, words: list[int]):
    """Store words at a protocol address in a pymodbus register block.

    pymodbus hands an action the whole block of one table as a flat list whose
    element 0 is the block's lowest address (block_start).
    """
    first = address - block_start
    registers[first : first + len(words)] = words


class Site:
    """The electrical state shared by the meter and the PDU."""

    def __init__(self, outlets: int, rated_w: int, base_kw: float):
        self.rated_w = rated_w
        self.base_kw = base_kw
        # Mirror of the PDU's coils. pymodbus keeps the coils themselves; this
        # copy is updated from the same accepted writes, in the same action
        # call that lets pymodbus store them, so the two cannot drift apart.
        self.relay_on = [True] * outlets

    def outlet_w(self, outlet: int) -> int:
        """Power drawn through one outlet, W."""
        return self.rated_w if self.relay_on[outlet] else 0

    def pdu_total_w(self) -> int:
        """Power drawn through the whole PDU, W."""
        return sum(self.outlet_w(i) for i in range(len(self.relay_on)))

    def meter_kw(self) -> float:
        """Power seen by the site meter, kW."""
        return self.base_kw + self.pdu_total_w() / 1000.0

    # --- pymodbus device actions -------------------------------------------
    #
    # pymodbus (3.16) calls a SimDevice's action on every request that passed
    # its own address checks, before it reads or stores the registers:
    #   action(function_code, block_start, address, count, registers, set_values)
    # set_values is the list being written, or None for a read. The action may
    # rewrite `registers` in place (what the read then returns) or return an
    # ExcCodes member to answer with a Modbus exception instead.
    # Note: for coil requests pymodbus passes `count` in 16-bit words, not in
    # coils, so coil ranges are checked here from `address` and set_values.

    async def meter_action(
        self, function_code, block_start, _address, _count, registers, _set_values
    ):
        """Unit 1: only its input registers exist; fill them at read time."""
        if function_code != FC_READ_INPUT_REGISTERS:
            # The meter has no coils or discrete inputs (pymodbus needs a
            # placeholder block for them, which this hides).
            return ExcCodes.ILLEGAL_ADDRESS
        put(registers, block_start, METER_POWER_KW, f32_words(self.meter_kw()))
        put(registers, block_start, METER_FREQUENCY_HZ, f32_words(FREQUENCY_HZ))
        return None

    async def pdu_action(
        self, function_code, block_start, address, _count, registers, set_values
    ):
        """Unit 2: relays as coils, powers as input registers."""
        outlets = len(self.relay_on)
        if function_code in COIL_FUNCTIONS:
            # pymodbus sizes coil blocks in multiples of 16, so it would
            # accept the padding coils N..15 by itself: refuse them here.
            if address >= outlets:
                return ExcCodes.ILLEGAL_ADDRESS
            if set_values is not None:
                if address + len(set_values) > outlets:
                    return ExcCodes.ILLEGAL_ADDRESS
                on = [bool(v) for v in set_values]
                self.relay_on[address : address + len(on)] = on
                values = ",".join("1" if v else "0" for v in on)
                emit(f"write {PDU_UNIT} {address} {values}")
            return None
        if function_code == FC_READ_INPUT_REGISTERS:
            watts = [self.outlet_w(i) for i in range(outlets)]
            put(registers, block_start, PDU_OUTLET_W, watts)
            put(registers, block_start, PDU_TOTAL_W, u32_words(self.pdu_total_w()))
            return None
        # Discrete inputs: the PDU has none (placeholder block, as above).
        return ExcCodes.ILLEGAL_ADDRESS

    # --- pymodbus device definitions ---------------------------------------

    def devices(self) -> list[SimDevice]:
        """The two units, as pymodbus SimDevices.

        Each device uses four separate tables, given as the tuple
        (coils, discrete inputs, holding registers, input registers). A table
        must hold at least one SimData; addresses it does not cover are
        answered by pymodbus itself with exception 02 (illegal data address).
        Holding registers exist on neither unit: a single DataType.INVALID
        register makes every holding-register request an exception 02.
        """

        def no_bits():
            return [SimData(0, values=False, datatype=DataType.BITS)]

        def no_holding():
            return [SimData(0, datatype=DataType.INVALID)]

        meter = SimDevice(
            METER_UNIT,
            simdata=(
                no_bits(),
                no_bits(),
                no_holding(),
                [SimData(0, count=METER_REGISTERS, datatype=DataType.REGISTERS)],
            ),
            action=self.meter_action,
        )
        outlets = len(self.relay_on)
        pdu = SimDevice(
            PDU_UNIT,
            simdata=(
                [SimData(0, values=[True] * outlets, datatype=DataType.BITS)],
                no_bits(),
                no_holding(),
                [
                    SimData(PDU_OUTLET_W, count=outlets, datatype=DataType.REGISTERS),
                    SimData(PDU_TOTAL_W, count=2, datatype=DataType.REGISTERS),
                ],
            ),
            action=self.pdu_action,
        )
        return [meter, pdu]


def watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, fd: int) -> None:
    """Block until stdin (fd) reaches EOF or fails, then ask to stop.

    Runs in a daemon thread. os.read on the raw descriptor works for pipes,
    files and terminals alike and takes no lock that interpreter shutdown
    could wait on.
    """
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    try:
        loop.call_soon_threadsafe(stop.set)
    except RuntimeError:  # the loop has already closed
        pass


async def serve(site: Site) -> int:
    """Run the server until stdin EOF or a signal; return the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # Port 0: the OS picks a free port when pymodbus binds. Loopback only.
    server = ModbusTcpServer(site.devices(), address=("127.0.0.1", 0))
    # background=True returns once the socket is listening (and raises
    # RuntimeError if it could not listen).
    await server.serve_forever(background=True)
    # pymodbus keeps the asyncio.Server it listens with in .transport; its
    # socket tells which port the OS chose.
    port = server.transport.sockets[0].getsockname()[1]
    emit(f"ready {port}")

    if sys.stdin is None:
        # Started with stdin closed: it is at EOF already. (Its descriptor 0
        # may since have been reused for a socket, so never read fd 0 then.)
        stop.set()
    else:
        stdin_fd = sys.stdin.fileno()
        threading.Thread(
            target=watch_stdin, args=(loop, stop, stdin_fd), daemon=True
        ).start()
    await stop.wait()
    await server.shutdown()
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Modbus TCP site (meter + PDU) served by pymodbus."
    )
    parser.add_argument("--outlets", type=int, default=8, help="PDU outlets (1-100)")
    parser.add_argument(
        "--rated-w", type=int, default=3000, help="power of an outlet that is on, W"
    )
    parser.add_argument(
        "--base-kw", type=float, default=20.0, help="site load besides the PDU, kW"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.outlets <= MAX_OUTLETS:
        parser.error(f"--outlets must be 1..{MAX_OUTLETS}")
    if not 0 <= args.rated_w <= 0xFFFF:
        parser.error("--rated-w must fit a u16 (0..65535)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # pymodbus logs through the "pymodbus" logger tree; keep it on stderr so
    # that stdout carries only the protocol lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pymodbus %(levelname)s: %(message)s"))
    pymodbus_log = logging.getLogger("pymodbus")
    pymodbus_log.addHandler(handler)
    pymodbus_log.setLevel(logging.WARNING)
    pymodbus_log.propagate = False

    site = Site(args.outlets, args.rated_w, args.base_kw)
    return asyncio.run(serve(site))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
