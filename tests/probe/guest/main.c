/*
 * main.c - the probe's sequence: console, IDT, boot_params (or PVH's
 * hvm_start_info), E820, initrd, ACPI, CPU; then "probe: PASS" (or FAIL lines), the boot-timer write and
 * poweroff. head.S calls probe_main on our own page tables and stack.
 */
#include "virtio.h"

/* head.S: how we were entered (rsi / ebx at the entry). */
#define BOOT_LINUX64 0	/* 64-bit boot protocol: info = boot_params */
#define BOOT_PVH 1	/* PVH: info = hvm_start_info */

void probe_main(u64 info, u64 load_addr, u64 protocol);

static const char *early_cmdline(u64 info, u64 protocol)
{
	if (protocol == BOOT_PVH)
		return pvh_cmdline(info);
	if (info && info < IDENT_LIMIT) {
		u64 cl = *(volatile u32 *)(info + 0x228);
		if (cl)
			return (const char *)cl;
	}
	return NULL;
}

void probe_main(u64 info, u64 load_addr, u64 protocol)
{
	/* Timing runs (probe.quick=1): the boot timer as soon as C runs. */
	int quick = 0;
	const char *cl = early_cmdline(info, protocol);
	if (cl) {
		cmdline_set(cl);
		quick = cmdline_flag("probe.quick");
	}
	/* Like the guest image: the boot timer only when the monitor maps it
	 * (b2p-vmm --boot-timer appends b2p.boot_timer=1). */
	int timer = cmdline_flag("b2p.boot_timer");
	if (quick && timer)
		boot_timer_write();

	console_init();
	/* The console marker every run prints (QEMU has no boot timer: the
	 * boot bench waits for this line); timing runs then print FAIL lines
	 * only. */
	pr("\nprobe: hello\n");
	console_quiet = quick;
	trap_init();
	if (protocol == BOOT_PVH)
		pvh_check(info, load_addr);
	else
		bootparams_check(info, load_addr);

	/* probe.flood=MS: the log-flood test's hostile guest (flood.c). */
	u64 flood_ms;
	if (cmdline_u64("probe.flood", &flood_ms)) {
		acpi_check();
		flood_run(flood_ms);
	}

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
