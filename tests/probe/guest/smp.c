/*
 * smp.c - starts every application processor the MADT lists with
 * INIT-SIPI-SIPI through the local APIC, the way Linux does: each AP runs
 * the real-mode trampoline from head.S into long mode on our page tables,
 * checks in with its APIC id and halts. Proves one runnable vCPU per MADT
 * LAPIC, and that the monitor ends a VM whose other vCPUs are halted.
 */
#include "probe.h"

#define AP_TRAMP 0x10000UL
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_PENDING (1u << 12)
#define AP_STACK 4096
#define MAX_APS 16

extern const u8 ap_tramp[], ap_tramp_end[], ap_tramp_cr3[], ap_tramp_stack[], ap_tramp_entry[];
extern void ap_start64(void);

static u8 ap_stacks[MAX_APS][AP_STACK] __attribute__((aligned(16), section(".bss.noinit")));
static volatile u32 ap_checked_in;
static volatile u32 ap_last_id;

void ap_main(void);

void ap_main(void)
{
	u64 lapic = acpi.lapic_base ? acpi.lapic_base : 0xfee00000UL;
	ap_last_id = mmio_read32(lapic + 0x20) >> 24;
	__atomic_add_fetch(&ap_checked_in, 1, __ATOMIC_SEQ_CST);
}

static void icr(u64 lapic, u32 apic_id, u32 lo)
{
	mmio_write32(lapic + LAPIC_ICR_HI, apic_id << 24);
	mmio_write32(lapic + LAPIC_ICR_LO, lo);
	for (int i = 0; i < 100000 && (mmio_read32(lapic + LAPIC_ICR_LO) & ICR_PENDING); i++)
		cpu_relax();
}

static void put64(const u8 *field, u64 v)
{
	u64 off = (u64)(field - ap_tramp);
	memcpy((void *)(AP_TRAMP + off), &v, 8);
}

void smp_check(const u8 *apic_ids, u32 n)
{
	u64 lapic = acpi.lapic_base ? acpi.lapic_base : 0xfee00000UL;
	u32 self = mmio_read32(lapic + 0x20) >> 24;
	usize size = (usize)(ap_tramp_end - ap_tramp);
	if (n <= 1) {
		pr("probe: smp 1 cpu, no APs to start\n");
		return;
	}
	if (!e820_is_ram(AP_TRAMP, 0x1000) || size > 0x1000 ||
	    (boot.info_page < AP_TRAMP + 0x1000 && AP_TRAMP < boot.info_page + 0x1000) ||
	    (boot.cmdline < AP_TRAMP + 0x1000 && AP_TRAMP < boot.cmdline + 2048)) {
		fail("smp: no free RAM page at 0x%lx for the AP trampoline", AP_TRAMP);
		return;
	}
	memcpy((void *)AP_TRAMP, ap_tramp, size);
	put64(ap_tramp_cr3, read_cr3());
	put64(ap_tramp_entry, (u64)ap_start64);
	lapic_enable();

	u32 started = 0, k = 0;
	for (u32 i = 0; i < n; i++) {
		u32 id = apic_ids[i];
		if (id == self)
			continue;
		if (k >= MAX_APS) {
			pr("probe: smp not starting more than %d APs\n", MAX_APS);
			break;
		}
		put64(ap_tramp_stack, (u64)(ap_stacks[k] + AP_STACK));
		k++;
		u32 before = ap_checked_in;
		icr(lapic, id, 0x4500);		/* INIT, level assert */
		hold_ms(10);
		for (int s = 0; s < 2 && ap_checked_in == before; s++) {
			icr(lapic, id, 0x4600 | (u32)(AP_TRAMP >> 12));	/* STARTUP */
			for (int t = 0; t < 200 && ap_checked_in == before; t++)
				hold_ms(1);
		}
		for (int t = 0; t < 2000 && ap_checked_in == before; t++)
			hold_ms(1);
		if (ap_checked_in == before) {
			fail("smp: AP with APIC id %u did not start", id);
			continue;
		}
		if (ap_last_id != id)
			fail("smp: AP started for APIC id %u reports id %u", id, ap_last_id);
		started++;
	}
	pr("probe: smp started %u of %u APs (bsp apic id %u)\n", started, n - 1, self);
}
