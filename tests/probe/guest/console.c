/*
 * console.c - output on the 8250 UART at 0x3f8 and a small printf.
 *
 * Supports %s %c %d %u %x %p with the l length modifier, a 0 flag and a
 * field width: enough for the probe's report lines.
 */
#include "probe.h"

#define COM1 0x3f8
#define UART_THR 0
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20
#define FIFO_DEPTH 16

static int fifo_room;
int console_quiet;	/* only FAIL lines (timing runs) */

void console_init(void)
{
	outb(COM1 + UART_IER, 0x00);	/* no UART interrupts */
	outb(COM1 + UART_LCR, 0x80);	/* DLAB: divisor 1 = 115200 baud */
	outb(COM1 + 0, 0x01);
	outb(COM1 + 1, 0x00);
	outb(COM1 + UART_LCR, 0x03);	/* 8N1 */
	outb(COM1 + UART_FCR, 0x07);	/* FIFO on, cleared */
	outb(COM1 + UART_MCR, 0x03);	/* DTR | RTS */
	fifo_room = 0;
}

static void putc_raw(char c)
{
	/* Wait for an empty transmitter, then fill the 16-byte FIFO. */
	if (fifo_room == 0) {
		unsigned spins = 0;
		while (!(inb(COM1 + UART_LSR) & LSR_THRE) && ++spins < 1000000)
			cpu_relax();
		fifo_room = FIFO_DEPTH;
	}
	outb(COM1 + UART_THR, (u8)c);
	fifo_room--;
}

static void putc(char c)
{
	if (c == '\n')
		putc_raw('\r');
	putc_raw(c);
}

static void puts_n(const char *s, usize n)
{
	while (n--)
		putc(*s++);
}

static void put_num(u64 v, unsigned base, int neg, int width, char pad)
{
	char buf[24];
	int i = 0;
	do {
		unsigned d = (unsigned)(v % base);
		buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	if (neg)
		buf[i++] = '-';
	while (i < width--)
		putc(pad);
	while (i)
		putc(buf[--i]);
}

static void vpr(const char *fmt, __builtin_va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			putc(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, lng = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's': {
			const char *s = __builtin_va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			puts_n(s, strlen(s));
			break;
		}
		case 'c':
			putc((char)__builtin_va_arg(ap, int));
			break;
		case 'd': {
			s64 v = lng ? __builtin_va_arg(ap, s64) : __builtin_va_arg(ap, int);
			put_num(v < 0 ? (u64)-v : (u64)v, 10, v < 0, width, pad);
			break;
		}
		case 'u':
			put_num(lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10, 0, width, pad);
			break;
		case 'x':
			put_num(lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16, 0, width, pad);
			break;
		case 'p':
			puts_n("0x", 2);
			put_num((u64)__builtin_va_arg(ap, void *), 16, 0, width, pad);
			break;
		case '%':
			putc('%');
			break;
		case 0:
			return;
		default:
			putc('%');
			putc(*fmt);
		}
	}
}

void pr(const char *fmt, ...)
{
	__builtin_va_list ap;
	if (console_quiet)
		return;
	__builtin_va_start(ap, fmt);
	vpr(fmt, ap);
	__builtin_va_end(ap);
}

int failures;

void fail(const char *fmt, ...)
{
	__builtin_va_list ap;
	failures++;
	console_quiet = 0;
	pr("probe: FAIL ");
	__builtin_va_start(ap, fmt);
	vpr(fmt, ap);
	__builtin_va_end(ap);
	pr("\n");
}
