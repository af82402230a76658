/*
 * lib.c - the few libc routines the probe needs (gcc may also emit calls
 * to memset/memcpy/memcmp itself), plus checksums.
 */
#include "probe.h"

void *memset(void *d, int c, usize n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, usize n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p < *q ? -1 : 1;
	return 0;
}

usize strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, usize n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (u8)*a < (u8)*b ? -1 : 1;
		if (!*a)
			return 0;
	}
	return 0;
}

u8 sum8(const void *p, usize n)
{
	const u8 *b = p;
	u8 s = 0;
	while (n--)
		s += *b++;
	return s;
}

/*
 * The initrd checksum the test computes on the host: FNV-1a 64 over
 * little-endian 64-bit words, the tail zero-padded. Word-wise because every
 * guest instruction is emulated on this workplace's KVM.
 */
u64 fnv1a64_words(const void *p, usize n)
{
	const u8 *b = p;
	u64 h = 0xcbf29ce484222325UL;
	for (; n >= 8; n -= 8, b += 8) {
		u64 w;
		memcpy(&w, b, 8);
		h ^= w;
		h *= 0x100000001b3UL;
	}
	if (n) {
		u64 w = 0;
		memcpy(&w, b, n);
		h ^= w;
		h *= 0x100000001b3UL;
	}
	return h;
}
