/*
 * ioapic.c - routes a device's GSI (from its DSDT node) through the IOAPIC
 * the MADT declares to a local-APIC vector: edge, active high, fixed
 * delivery, physical destination.
 */
#include "virtio.h"

#define IOREGSEL 0x00
#define IOWIN 0x10
#define IOAPIC_VER 0x01
#define REDIR(pin) (0x10 + 2 * (pin))
#define REDIR_MASKED (1u << 16)

static u64 ioapic_base(void)
{
	return acpi.ioapic_base ? acpi.ioapic_base : 0xfec00000UL;
}

static u32 ioapic_read(u32 reg)
{
	mmio_write32(ioapic_base() + IOREGSEL, reg);
	return mmio_read32(ioapic_base() + IOWIN);
}

static void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(ioapic_base() + IOREGSEL, reg);
	mmio_write32(ioapic_base() + IOWIN, v);
}

void ioapic_route(u32 gsi, u8 vector, u32 apic_id)
{
	u32 pin = gsi - acpi.ioapic_gsi_base;
	u32 pins = ((ioapic_read(IOAPIC_VER) >> 16) & 0xff) + 1;
	if (gsi < acpi.ioapic_gsi_base || pin >= pins) {
		fail("gsi %u is not on the IOAPIC (gsi_base %u, %u pins)", gsi, acpi.ioapic_gsi_base, pins);
		return;
	}
	ioapic_write(REDIR(pin) + 1, apic_id << 24);
	ioapic_write(REDIR(pin), vector);	/* fixed, physical, high, edge, unmasked */
	u32 back = ioapic_read(REDIR(pin));
	if ((back & 0xff) != vector || (back & REDIR_MASKED))
		fail("IOAPIC pin %u reads back 0x%x", pin, back);
}

void ioapic_mask(u32 gsi)
{
	u32 pin = gsi - acpi.ioapic_gsi_base;
	ioapic_write(REDIR(pin), REDIR_MASKED);
}
