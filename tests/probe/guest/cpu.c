/*
 * cpu.c - checks the vCPU the monitor set up: CPUID (hypervisor bit, APIC
 * id in leaf 1 and leaf 0xb) against the LAPIC's own id register, and that
 * this CPU's APIC id is one of the MADT's.
 */
#include "probe.h"

#define LAPIC_DEFAULT 0xfee00000UL
#define LAPIC_ID 0x20
#define LAPIC_VER 0x30

void cpu_check(void)
{
	u32 a, b, c, d;
	cpuid(0, 0, &a, &b, &c, &d);
	u32 max_leaf = a;
	char vendor[13];
	memcpy(vendor, &b, 4);
	memcpy(vendor + 4, &d, 4);
	memcpy(vendor + 8, &c, 4);
	vendor[12] = 0;

	cpuid(1, 0, &a, &b, &c, &d);
	u32 apic_id1 = b >> 24;
	int hv = (c >> 31) & 1;
	int x2apic = (c >> 21) & 1;
	u32 x2id = apic_id1;
	if (max_leaf >= 0xb) {
		u32 a2, b2, c2, d2;
		cpuid(0xb, 0, &a2, &b2, &c2, &d2);
		if (b2)
			x2id = d2;
	}
	char hvsig[13];
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	memcpy(hvsig, &b, 4);
	memcpy(hvsig + 4, &c, 4);
	memcpy(hvsig + 8, &d, 4);
	hvsig[12] = 0;
	for (int i = 0; i < 12; i++)
		if (hvsig[i] && (hvsig[i] < 0x20 || hvsig[i] > 0x7e))
			hvsig[i] = '?';

	u64 lapic = acpi.lapic_base ? acpi.lapic_base : LAPIC_DEFAULT;
	u32 lid = mmio_read32(lapic + LAPIC_ID) >> 24;
	u32 lver = mmio_read32(lapic + LAPIC_VER) & 0xff;
	pr("probe: cpu vendor \"%s\" max_leaf=0x%x hypervisor=%d \"%s\" x2apic=%d apic_id=%u leaf_b_id=%u lapic_id=%u lapic_ver=0x%x\n",
	   vendor, max_leaf, hv, hvsig, x2apic, apic_id1, x2id, lid, lver);
	if (!hv)
		fail("CPUID.1:ECX.hypervisor is clear");
	if (apic_id1 != lid)
		fail("CPUID APIC id %u != LAPIC id %u", apic_id1, lid);
	if (x2id != apic_id1)
		fail("CPUID.0xb x2APIC id %u != CPUID.1 APIC id %u", x2id, apic_id1);
	if (lver < 0x10)
		fail("LAPIC version 0x%x: no integrated local APIC", lver);
}
