/*
 * cmdline.c - the probe's own command-line switches (probe.KEY=VALUE).
 *
 *   probe.mem=MiB         expected guest memory (E820 check)
 *   probe.cpus=N          expected vCPU count (MADT check)
 *   probe.initrd_sum=0xHEX FNV-1a 64 over the initrd's 64-bit words
 *   probe.initrd_size=N   expected initrd size in bytes
 *   probe.hold_ms=N       stay alive N ms before powering off (RSS bench)
 *   probe.quick=1         boot timer + poweroff right away, quiet (timing bench)
 *   probe.flood=MS        write an unknown virtio-mmio register for MS ms (flood.c)
 *   b2p.boot_timer=1      write the boot timer (b2p-vmm --boot-timer adds it)
 */
#include "probe.h"

static const char *cmdline = "";

void cmdline_set(const char *s)
{
	cmdline = s ? s : "";
}

/* Finds "key=" at the start of a space-separated token; returns the value. */
static const char *find(const char *key)
{
	usize klen = strlen(key);
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		if (!strncmp(p, key, klen) && p[klen] == '=')
			return p + klen + 1;
		while (*p && *p != ' ')
			p++;
	}
	return NULL;
}

static int digit(char c, unsigned base)
{
	int d;
	if (c >= '0' && c <= '9')
		d = c - '0';
	else if (c >= 'a' && c <= 'f')
		d = c - 'a' + 10;
	else if (c >= 'A' && c <= 'F')
		d = c - 'A' + 10;
	else
		return -1;
	return d < (int)base ? d : -1;
}

int cmdline_u64(const char *key, u64 *out)
{
	const char *v = find(key);
	unsigned base = 10;
	u64 n = 0;
	int any = 0, d;
	if (!v)
		return 0;
	if (v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
		base = 16;
		v += 2;
	}
	while ((d = digit(*v, base)) >= 0) {
		n = n * base + (u64)d;
		v++;
		any = 1;
	}
	if (!any || (*v && *v != ' '))
		return 0;
	*out = n;
	return 1;
}

/* The value of "key=" (up to the next space) in a static buffer, or NULL. */
const char *cmdline_str(const char *key)
{
	static char buf[64];
	const char *v = find(key);
	usize n = 0;
	if (!v)
		return NULL;
	while (v[n] && v[n] != ' ' && n + 1 < sizeof(buf)) {
		buf[n] = v[n];
		n++;
	}
	buf[n] = 0;
	return buf;
}

int cmdline_flag(const char *key)
{
	u64 v;
	return cmdline_u64(key, &v) && v != 0;
}
