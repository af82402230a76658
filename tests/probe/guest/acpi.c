/*
 * acpi.c - finds and checks the monitor's ACPI tables from inside: RSDP
 * (scanned like a 4.19 kernel does, and via boot_params.acpi_rsdp_addr),
 * XSDT, FADT (hardware-reduced, sleep registers), MADT (LAPICs vs
 * probe.cpus, IOAPIC) and the DSDT (_S5_, COM1, virtio-mmio nodes).
 */
#include "probe.h"

struct acpi_info acpi;

struct sdt_header {
	char sig[4];
	u32 length;
	u8 revision;
	u8 checksum;
	char oem_id[6];
	char oem_table_id[8];
	u32 oem_revision;
	u32 creator_id;
	u32 creator_revision;
} __attribute__((packed));

#define MAX_TABLE_LEN (1u << 20)

static u32 rd32(const u8 *p) { return p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }
static u64 rd64(const u8 *p) { return rd32(p) | (u64)rd32(p + 4) << 32; }

static u64 find_rsdp(u64 from, u64 to)
{
	for (u64 a = from; a + 36 <= to; a += 16)
		if (!memcmp((const void *)a, "RSD PTR ", 8))
			return a;
	return 0;
}

/* Checks one table header; prints "probe: acpi SIG ..." and returns its length or 0. */
static u32 check_table(u64 addr, const char *want)
{
	if (addr == 0 || addr >= IDENT_LIMIT) {
		fail("acpi %s pointer 0x%lx", want ? want : "table", addr);
		return 0;
	}
	const struct sdt_header *h = (const void *)addr;
	char sig[5];
	memcpy(sig, h->sig, 4);
	sig[4] = 0;
	for (int i = 0; i < 4; i++)
		if (sig[i] < 0x20 || sig[i] > 0x7e)
			sig[i] = '?';
	if (want && memcmp(sig, want, 4)) {
		fail("acpi table at 0x%lx has signature %s, expected %s", addr, sig, want);
		return 0;
	}
	u32 len = h->length;
	if (len < sizeof(*h) || len > MAX_TABLE_LEN || addr + len > IDENT_LIMIT) {
		fail("acpi %s length %u", sig, len);
		return 0;
	}
	u8 cs = sum8(h, len);
	char oem[7];
	memcpy(oem, h->oem_id, 6);
	oem[6] = 0;
	pr("probe: acpi %s 0x%lx len %u rev %u oem \"%s\" checksum %s\n", sig, addr, len, h->revision,
	   oem, cs ? "BAD" : "ok");
	if (cs) {
		fail("acpi %s checksum", sig);
		return 0;
	}
	if (!e820_is_ram(addr, len)) {
		/* Must not be usable RAM the kernel would overwrite: reserved/ACPI is right. */
	} else {
		fail("acpi %s at 0x%lx lies in E820 RAM: the kernel may overwrite it", sig, addr);
	}
	return len;
}

static void check_rsdp(void)
{
	u64 ebda = (u64)mmio_read16(phys(0x40e)) << 4;
	u64 scanned = 0;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		scanned = find_rsdp(ebda, ebda + 1024);
	if (!scanned)
		scanned = find_rsdp(0xe0000, 0x100000);
	/* PVH: rsdp_paddr 0 means "not given, scan" (Linux does). */
	const char *field = boot.pvh ? "hvm_start_info.rsdp_paddr" : "boot_params.acpi_rsdp_addr";
	pr("probe: acpi rsdp scan=0x%lx %s=0x%lx\n", scanned, field, boot.rsdp);
	if (!scanned)
		fail("no RSDP in the EBDA or 0xe0000-0xfffff (kernels before 5.0 only scan there)");
	if (!boot.rsdp && !boot.pvh)
		fail("%s is 0", field);
	else if (boot.rsdp && scanned && boot.rsdp != scanned)
		fail("%s 0x%lx != scanned RSDP 0x%lx", field, boot.rsdp, scanned);
	u64 a = boot.rsdp ? boot.rsdp : scanned;
	if (!a || a >= IDENT_LIMIT)
		return;
	const u8 *r = (const u8 *)a;
	if (memcmp(r, "RSD PTR ", 8)) {
		fail("no RSDP signature at 0x%lx", a);
		return;
	}
	u8 rev = r[15];
	u32 len = rd32(r + 20);
	char oem[7];
	memcpy(oem, r + 9, 6);
	oem[6] = 0;
	int ok = sum8(r, 20) == 0 && rev >= 2 && len >= 36 && len < 4096 && sum8(r, len) == 0;
	pr("probe: acpi RSDP 0x%lx rev %u len %u oem \"%s\" checksum %s\n", a, rev, len, oem,
	   ok ? "ok" : "BAD");
	if (!ok) {
		fail("RSDP checksum/revision/length");
		return;
	}
	acpi.rsdp = a;
	acpi.xsdt = rd64(r + 24);
}

/* AML PkgLength: returns the encoded length and advances *p. */
static u32 aml_pkglen(const u8 **p, const u8 *end)
{
	const u8 *q = *p;
	if (q >= end)
		return 0;
	u8 lead = *q++;
	u32 n = lead >> 6;
	u32 len = n ? (lead & 0x0f) : (lead & 0x3f);
	for (u32 i = 0; i < n; i++) {
		if (q >= end)
			return 0;
		len |= (u32)*q++ << (4 + 8 * i);
	}
	*p = q;
	return len;
}

static void check_dsdt(void)
{
	u32 len = check_table(acpi.dsdt, "DSDT");
	if (!len)
		return;
	acpi.dsdt_len = len;
	const u8 *aml = (const u8 *)acpi.dsdt + 36, *end = (const u8 *)acpi.dsdt + len;
	int com1 = 0, virtio = 0;
	acpi.s5_typ = -1;
	for (const u8 *p = aml; p + 12 <= end; p++) {
		/* Memory32Fixed: no _CRS may claim the boot-timer page (DESIGN §3). */
		if (p[0] == 0x86 && p[1] == 0x09 && p[2] == 0x00) {
			u64 base = rd32(p + 4), len = rd32(p + 8);
			if (base <= 0xc0000000UL && 0xc0000000UL < base + len)
				fail("a DSDT _CRS claims the boot-timer page (0x%lx+0x%lx)", base, len);
		}
	}
	for (const u8 *p = aml; p + 8 <= end; p++) {
		if (!memcmp(p, "PNP0501", 7) || (p[0] == 0x0c && p + 5 <= end && rd32(p + 1) == 0x0105d041))
			com1++;
		if (!memcmp(p, "LNRO0005", 8))
			virtio++;
		if (!memcmp(p, "_S5_", 4) && p > aml && (p[-1] == 0x08 || p[-1] == '\\')) {
			const u8 *q = p + 4;
			if (q < end && *q == 0x12) {	/* PackageOp */
				q++;
				aml_pkglen(&q, end);
				q++;	/* NumElements */
				if (q < end) {
					if (*q == 0x0a && q + 1 < end)
						acpi.s5_typ = q[1];
					else if (*q == 0x00)
						acpi.s5_typ = 0;
					else if (*q == 0x01)
						acpi.s5_typ = 1;
				}
			}
		}
	}
	pr("probe: acpi DSDT s5=%d com1=%d virtio_mmio=%d\n", acpi.s5_typ, com1, virtio);
	if (acpi.s5_typ < 0)
		fail("DSDT has no Name(_S5_, Package(){...}): Linux will not offer poweroff");
	if (!com1)
		fail("DSDT has no COM1 (PNP0501) device");
}

static void check_fadt(void)
{
	u32 len = check_table(acpi.fadt, "FACP");
	if (!len)
		return;
	const u8 *f = (const u8 *)acpi.fadt;
	u32 flags = len >= 116 ? rd32(f + 112) : 0;
	int hw_reduced = (flags >> 20) & 1;
	u64 dsdt = len >= 148 ? rd64(f + 140) : 0;
	if (!dsdt && len >= 44)
		dsdt = rd32(f + 40);
	acpi.dsdt = dsdt;
	if (len >= 268) {
		memcpy(&acpi.sleep_control, f + 244, sizeof(struct gas));
		memcpy(&acpi.sleep_status, f + 256, sizeof(struct gas));
		acpi.have_sleep_regs = acpi.sleep_control.address != 0 && acpi.sleep_status.address != 0;
	}
	pr("probe: acpi FACP hw_reduced=%d dsdt=0x%lx sleep_control=%s:0x%lx sleep_status=%s:0x%lx\n",
	   hw_reduced, dsdt, acpi.sleep_control.space ? "io" : "mem", acpi.sleep_control.address,
	   acpi.sleep_status.space ? "io" : "mem", acpi.sleep_status.address);
	if (!hw_reduced)
		fail("FADT is not HW_REDUCED_ACPI");
	if (!acpi.have_sleep_regs)
		fail("FADT has no SLEEP_CONTROL/SLEEP_STATUS registers");
}

static void check_madt(void)
{
	u32 len = check_table(acpi.madt, "APIC");
	if (!len)
		return;
	const u8 *m = (const u8 *)acpi.madt;
	acpi.lapic_base = rd32(m + 36);
	u32 flags = rd32(m + 40);
	u32 lapics = 0, ioapics = 0, bad = 0;
	acpi.apic_id_count = 0;
	u8 seen[256 / 8];
	memset(seen, 0, sizeof(seen));
	for (u32 off = 44; off + 2 <= len;) {
		u8 type = m[off], elen = m[off + 1];
		if (elen < 2 || off + elen > len) {
			fail("MADT entry at +%u has length %u", off, elen);
			return;
		}
		const u8 *e = m + off;
		if (type == 0 && elen >= 8) {
			u8 id = e[3];
			u32 fl = rd32(e + 4);
			if (fl & 1) {
				lapics++;
				if (acpi.apic_id_count < sizeof(acpi.apic_ids))
					acpi.apic_ids[acpi.apic_id_count++] = id;
				if (seen[id / 8] & (1 << (id % 8)))
					bad++;
				seen[id / 8] |= (u8)(1 << (id % 8));
			}
		} else if (type == 9 && elen >= 16) {
			if (rd32(e + 8) & 1)
				lapics++;
		} else if (type == 1 && elen >= 12) {
			ioapics++;
			if (!acpi.ioapic_base) {
				acpi.ioapic_base = rd32(e + 4);
				acpi.ioapic_gsi_base = rd32(e + 8);
			}
		}
		off += elen;
	}
	acpi.lapic_count = lapics;
	u64 cpus = 0;
	int have = cmdline_u64("probe.cpus", &cpus);
	pr("probe: acpi MADT lapic_base=0x%lx pcat_compat=%u lapics=%u ioapics=%u ioapic=0x%lx gsi_base=%u expected_cpus=%ld\n",
	   acpi.lapic_base, flags & 1, lapics, ioapics, acpi.ioapic_base, acpi.ioapic_gsi_base,
	   have ? (s64)cpus : -1L);
	if (bad)
		fail("MADT has duplicate APIC ids");
	if (have && lapics != cpus)
		fail("MADT has %u enabled LAPICs, expected %lu", lapics, cpus);
	if (!ioapics)
		fail("MADT has no IOAPIC");
}

void acpi_check(void)
{
	memset(&acpi, 0, sizeof(acpi));
	acpi.s5_typ = -1;
	check_rsdp();
	if (!acpi.xsdt)
		return;
	u32 len = check_table(acpi.xsdt, "XSDT");
	if (!len)
		return;
	const u8 *x = (const u8 *)acpi.xsdt;
	u32 n = (len - 36) / 8;
	for (u32 i = 0; i < n; i++) {
		u64 a = rd64(x + 36 + 8 * i);
		if (a == 0 || a >= IDENT_LIMIT) {
			fail("XSDT entry %u = 0x%lx", i, a);
			continue;
		}
		const char *sig = (const char *)a;
		if (!memcmp(sig, "FACP", 4))
			acpi.fadt = a;
		else if (!memcmp(sig, "APIC", 4))
			acpi.madt = a;
		else
			check_table(a, NULL);
	}
	if (!acpi.fadt)
		fail("XSDT lists no FACP");
	else
		check_fadt();
	if (!acpi.madt)
		fail("XSDT lists no APIC (MADT)");
	else
		check_madt();
	if (!acpi.dsdt)
		fail("no DSDT");
	else
		check_dsdt();
}
