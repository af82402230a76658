/*
 * main.c - the probe's sequence: console, IDT, boot_params, E820, initrd,
 * ACPI, CPU; then "probe: PASS" (or FAIL lines), the boot-timer write and
 * poweroff. head.S calls probe_main on our own page tables and stack.
 */
#include "virtio.h"

void probe_main(u64 zero_page, u64 load_addr);

void probe_main(u64 zero_page, u64 load_addr)
{
	/* Timing runs (probe.quick=1): the boot timer as soon as C runs. */
	int quick = 0;
	if (zero_page && zero_page < IDENT_LIMIT) {
		u64 cl = *(volatile u32 *)(zero_page + 0x228);
		if (cl) {
			cmdline_set((const char *)cl);
			quick = cmdline_flag("probe.quick");
		}
	}
	/* Like the guest image: the boot timer only when the monitor maps it
	 * (b2p-vmm --boot-timer appends b2p.boot_timer=1). */
	int timer = cmdline_flag("b2p.boot_timer");
	if (quick && timer)
		boot_timer_write();
	console_quiet = quick;	/* timing runs print FAIL lines only */

	console_init();
	pr("\nprobe: hello\n");
	trap_init();
	bootparams_check(zero_page, load_addr);

	if (quick) {
		pr("probe: quick\n");
		acpi_check();
		poweroff();
	}

	e820_check();
	initrd_check();
	memtouch_check();
	acpi_check();
	cpu_check();
	if (!cmdline_flag("probe.nosmp"))
		smp_check(acpi.apic_ids, acpi.apic_id_count);
	virtio_run_all();

	if (failures)
		pr("probe: FAIL %d check(s) failed\n", failures);
	else
		pr("probe: PASS\n");

	if (timer) {
		boot_timer_write();
		pr("probe: boot timer written\n");
	}

	u64 ms;
	if (cmdline_u64("probe.hold_ms", &ms) && ms) {
		pr("probe: holding %lu ms\n", ms);
		hold_ms(ms);
		pr("probe: hold done\n");
	}
	poweroff();
}
