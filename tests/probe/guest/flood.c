/*
 * flood.c - probe.flood=MS: a hostile guest for the log-flood test
 * (tests/log_flood.rs). For MS milliseconds it writes, as fast as it can,
 * to a register that does not exist (offset 0x0f0) of the first
 * virtio-mmio device, then says how many writes it made and powers off.
 * Each write is an MMIO exit the monitor answers with a warning: the
 * monitor must keep its log bounded however long this runs.
 *
 * Time comes from the LAPIC timer's current-count register (masked
 * one-shot, 1 ns per count on KVM at divide-by-1), polled between bursts.
 */
#include "virtio.h"

#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define LVT_MASKED (1u << 16)
#define UNKNOWN_REG 0x0f0
#define BURST 64

void __attribute__((noreturn)) flood_run(u64 ms)
{
	virtio_discover();
	if (!vdev_count) {
		fail("probe.flood: no virtio-mmio device to flood");
		poweroff();
	}
	u64 reg = vdevs[0].base + UNKNOWN_REG;
	u64 lapic = acpi.lapic_base ? acpi.lapic_base : 0xfee00000UL;
	mmio_write32(lapic + LAPIC_TIMER_DIV, 0xb);	/* divide by 1 */
	mmio_write32(lapic + LAPIC_LVT_TIMER, LVT_MASKED);	/* one-shot, no interrupt */
	pr("probe: flood %lu ms of writes to 0x%lx\n", ms, reg);
	u64 writes = 0;
	while (ms) {
		u64 chunk = ms > 1000 ? 1000 : ms;
		mmio_write32(lapic + LAPIC_TIMER_INIT, (u32)(chunk * 1000000));
		do {
			for (int i = 0; i < BURST; i++)
				mmio_write32(reg, 0xdead0000u | (u32)i);
			writes += BURST;
		} while (mmio_read32(lapic + LAPIC_TIMER_CUR));
		ms -= chunk;
	}
	pr("probe: flood done, %lu writes\n", writes);
	poweroff();
}
