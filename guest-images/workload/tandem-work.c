/*
 * tandem-work: the guest workload for tandem's lab and tests.
 *
 *   tandem-work ticker [--interval-ms MS] [--count N]
 *       Prints "tick <n> mono_ms=<CLOCK_MONOTONIC in ms>" for n = 1, 2, ...
 *       Tick n is due at start + n * MS (absolute deadlines, so the pace does
 *       not drift). Prints TANDEM-CLOCK-BACKWARDS if CLOCK_MONOTONIC ever
 *       goes backwards. Stops after N ticks (default: never).
 *
 *   tandem-work dirty --mib-per-sec R --span-mib S [--seconds T]
 *       Maps S MiB and, every 100 ms, writes R*256/10 pages of it (walking the
 *       span round-robin). Every written page holds a stamp that is a function
 *       of (page index, pass number), so the whole span can be checked: once a
 *       second it prints "dirty <sec> pages=<pages written so far> check=OK"
 *       (or "check=BAD page=<i>"). Stops after T seconds (default: never).
 *
 *   tandem-work net --port P
 *       A TCP server for the network tests and drills: each line a client sends
 *       is a number N, and the answer is the line "N <mix64(N) in hex>", so a
 *       client can check every reply. One process per connection.
 *
 *   tandem-work blob --mib M
 *       Writes M MiB to stdout: mix64(0), mix64(1), ... as little-endian 64-bit
 *       words. The file httpd serves, whose hash a client computes on its own.
 *
 *   tandem-work journal --device PATH --count N [--burst B] [--interval-ms MS]
 *       Appends records 1..N to the block device PATH: record n is sector n, 512
 *       bytes: "TNDJ", n (u64), mix64(n ^ i) words, and in its last 8 bytes the
 *       FNV-1a hash of the rest. Each is written with O_DIRECT and then
 *       fdatasync'd, and only then is "journal <n>" printed: a printed number is
 *       durable. B records back to back (default 8), then a pause of MS
 *       (default 100). At the end it reads 1..N back and prints
 *       "journal-verdict records=N ok=K bad=M first_bad=F" and TANDEM-JOURNAL-OK
 *       or TANDEM-JOURNAL-BAD (exit 1).
 *
 *   tandem-work diskbench --device PATH [--writes N] [--seq-mib M]
 *       For `tandem bench disk`: N random 4 KiB writes (O_DIRECT, one at a time)
 *       over the device's first 64 MiB, each timed: "diskbench randwrite
 *       writes=N iops=X p50_us=Y p99_us=Z"; then M MiB of sequential 1 MiB
 *       O_DIRECT writes and an fdatasync: "diskbench seqwrite mib=M mb_s=W".
 *
 * Exit status: 0 on success, 1 if a check failed or a system call failed,
 * 2 on argument errors. Every line is emitted with one write(2), so output is
 * never held in a buffer when the VM is paused, copied or killed.
 *
 * Built with: gcc -static -Os -s (no stdio).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096UL
#define STEP_NS 100000000LL /* dirty: one step every 100 ms */
#define STEPS_PER_SEC 10

/* ---- output without stdio: one write(2) per line ---- */

struct line {
	char buf[256];
	size_t len;
};

static void put_str(struct line *l, const char *s)
{
	while (*s && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = *s++;
}

static void put_u64(struct line *l, uint64_t v)
{
	char tmp[24];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n > 0 && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = tmp[--n];
}

static void emit(int fd, struct line *l)
{
	size_t off = 0;
	l->buf[l->len++] = '\n';
	while (off < l->len) {
		ssize_t w = write(fd, l->buf + off, l->len - off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return; /* nowhere to report it */
		}
		off += (size_t)w;
	}
	l->len = 0;
}

static void say(int fd, const char *a, const char *b)
{
	struct line l = { .len = 0 };
	put_str(&l, a);
	if (b)
		put_str(&l, b);
	emit(fd, &l);
}

static void usage(void)
{
	say(2, "usage: tandem-work ticker [--interval-ms MS] [--count N]", NULL);
	say(2, "       tandem-work dirty --mib-per-sec R --span-mib S [--seconds T]", NULL);
	say(2, "       tandem-work net --port P", NULL);
	say(2, "       tandem-work blob --mib M", NULL);
	say(2, "       tandem-work journal --device PATH --count N [--burst B] [--interval-ms MS]", NULL);
	say(2, "       tandem-work diskbench --device PATH [--writes N] [--seq-mib M]", NULL);
}

static void die_usage(const char *msg, const char *arg)
{
	struct line l = { .len = 0 };
	put_str(&l, "tandem-work: ");
	put_str(&l, msg);
	if (arg) {
		put_str(&l, ": ");
		put_str(&l, arg);
	}
	emit(2, &l);
	usage();
	_exit(2);
}

static void die_sys(const char *what)
{
	struct line l = { .len = 0 };
	put_str(&l, "tandem-work: ");
	put_str(&l, what);
	put_str(&l, ": ");
	put_str(&l, strerror(errno));
	emit(2, &l);
	_exit(1);
}

/* ---- arguments ---- */

/* Parses a decimal integer in [min, max]; exits 2 on anything else. */
static uint64_t parse_num(const char *opt, const char *s, uint64_t min, uint64_t max)
{
	uint64_t v = 0;
	const char *p = s;
	if (!s || !*s)
		die_usage("missing value for", opt);
	for (; *p; p++) {
		if (*p < '0' || *p > '9')
			die_usage("not a non-negative integer", s);
		if (v > (UINT64_MAX - 9) / 10)
			die_usage("number too large", s);
		v = v * 10 + (uint64_t)(*p - '0');
	}
	if (v < min || v > max)
		die_usage("value out of range", s);
	return v;
}

/*
 * Matches argv[*i] against "--name" or "--name=value". Returns the value
 * (taking the next argument for the "--name value" form) or NULL when the
 * argument is a different option.
 */
static const char *opt_value(int argc, char **argv, int *i, const char *name)
{
	const char *a = argv[*i];
	size_t n = strlen(name);
	if (strncmp(a, name, n) != 0)
		return NULL;
	if (a[n] == '=')
		return a + n + 1;
	if (a[n] != '\0')
		return NULL;
	if (*i + 1 >= argc)
		die_usage("missing value for", name);
	*i += 1;
	return argv[*i];
}

/* ---- time ---- */

static int64_t mono_ns(void)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		die_sys("clock_gettime");
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t deadline_ns)
{
	struct timespec ts = {
		.tv_sec = (time_t)(deadline_ns / 1000000000LL),
		.tv_nsec = (long)(deadline_ns % 1000000000LL),
	};
	int rc;
	while ((rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL)) == EINTR)
		;
	if (rc != 0) {
		errno = rc;
		die_sys("clock_nanosleep");
	}
}

/* Reads the clock and reports if it ever went backwards. */
static int64_t checked_now(int64_t *last)
{
	int64_t now = mono_ns();
	if (now < *last)
		say(1, "TANDEM-CLOCK-BACKWARDS", NULL);
	*last = now;
	return now;
}

/* ---- ticker ---- */

static int cmd_ticker(int argc, char **argv)
{
	uint64_t interval_ms = 100, count = 0; /* count 0: unlimited */
	for (int i = 0; i < argc; i++) {
		const char *v;
		if ((v = opt_value(argc, argv, &i, "--interval-ms")))
			interval_ms = parse_num("--interval-ms", v, 1, 86400000);
		else if ((v = opt_value(argc, argv, &i, "--count")))
			count = parse_num("--count", v, 1, UINT64_MAX / 2);
		else
			die_usage("unknown argument", argv[i]);
	}

	int64_t last = 0;
	int64_t start = checked_now(&last);
	for (uint64_t n = 1; count == 0 || n <= count; n++) {
		sleep_until(start + (int64_t)(n * interval_ms) * 1000000LL);
		int64_t now = checked_now(&last);
		struct line l = { .len = 0 };
		put_str(&l, "tick ");
		put_u64(&l, n);
		put_str(&l, " mono_ms=");
		put_u64(&l, (uint64_t)(now / 1000000LL));
		emit(1, &l);
	}
	return 0;
}

/* ---- dirty ---- */

/* splitmix64 finaliser: a cheap, well-mixed deterministic function. */
static inline uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* The stamp of page `page` written in pass `pass` (never 0: 0 = unwritten). */
static inline uint64_t stamp(uint64_t page, uint64_t pass)
{
	return mix64((pass << 32) ^ page) | 1;
}

/*
 * A page holds its stamp in its first 8 bytes and the complement in its last
 * 8 bytes, so a page that was only partly copied is caught as well.
 */
static inline void write_page(unsigned char *base, uint64_t page, uint64_t pass)
{
	volatile uint64_t *p = (volatile uint64_t *)(base + page * PAGE_SIZE);
	uint64_t s = stamp(page, pass);
	p[0] = s;
	p[PAGE_SIZE / 8 - 1] = ~s;
}

/*
 * After `written` page writes in total over a span of `npages` pages (page
 * w % npages is written in pass w / npages), checks every page. Returns the
 * index of the first bad page, or -1 when all are as expected.
 */
static int64_t check_span(const unsigned char *base, uint64_t npages, uint64_t written)
{
	uint64_t full = written / npages, rem = written % npages;
	for (uint64_t i = 0; i < npages; i++) {
		const volatile uint64_t *p = (const volatile uint64_t *)(base + i * PAGE_SIZE);
		uint64_t want_lo, want_hi;
		if (i < rem || full > 0) {
			uint64_t pass = i < rem ? full : full - 1;
			want_lo = stamp(i, pass);
			want_hi = ~want_lo;
		} else {
			want_lo = want_hi = 0; /* never written: still zero from mmap */
		}
		if (p[0] != want_lo || p[PAGE_SIZE / 8 - 1] != want_hi)
			return (int64_t)i;
	}
	return -1;
}

static int cmd_dirty(int argc, char **argv)
{
	uint64_t rate = 0, span = 0, seconds = 0; /* seconds 0: unlimited */
	int have_rate = 0, have_span = 0;
	for (int i = 0; i < argc; i++) {
		const char *v;
		if ((v = opt_value(argc, argv, &i, "--mib-per-sec"))) {
			rate = parse_num("--mib-per-sec", v, 0, 1 << 20);
			have_rate = 1;
		} else if ((v = opt_value(argc, argv, &i, "--span-mib"))) {
			span = parse_num("--span-mib", v, 1, 1 << 20);
			have_span = 1;
		} else if ((v = opt_value(argc, argv, &i, "--seconds"))) {
			seconds = parse_num("--seconds", v, 1, UINT64_MAX / 1000);
		} else {
			die_usage("unknown argument", argv[i]);
		}
	}
	if (!have_rate)
		die_usage("missing --mib-per-sec", NULL);
	if (!have_span)
		die_usage("missing --span-mib", NULL);

	uint64_t npages = span * (1024 * 1024 / PAGE_SIZE);
	unsigned char *base = mmap(NULL, npages * PAGE_SIZE, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (base == MAP_FAILED)
		die_sys("mmap");

	/* Pages due by the end of step k: floor(k * rate * 256 / 10). */
	uint64_t pages_per_sec = rate * (1024 * 1024 / PAGE_SIZE);
	uint64_t written = 0, cursor = 0, pass = 0;
	int bad_seen = 0;
	int64_t last = 0;
	int64_t start = checked_now(&last);
	for (uint64_t step = 1;; step++) {
		sleep_until(start + (int64_t)step * STEP_NS);
		(void)checked_now(&last);

		uint64_t due = step * pages_per_sec / STEPS_PER_SEC;
		for (; written < due; written++) {
			write_page(base, cursor, pass);
			if (++cursor == npages) {
				cursor = 0;
				pass++;
			}
		}

		if (step % STEPS_PER_SEC == 0) {
			uint64_t sec = step / STEPS_PER_SEC;
			int64_t bad = check_span(base, npages, written);
			struct line l = { .len = 0 };
			put_str(&l, "dirty ");
			put_u64(&l, sec);
			put_str(&l, " pages=");
			put_u64(&l, written);
			if (bad < 0) {
				put_str(&l, " check=OK");
			} else {
				put_str(&l, " check=BAD page=");
				put_u64(&l, (uint64_t)bad);
				bad_seen = 1;
			}
			emit(1, &l);
			if (seconds && sec >= seconds)
				break;
		}
	}
	return bad_seen ? 1 : 0;
}

/* ---- net ---- */

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t w = write(fd, buf, len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		buf += w;
		len -= (size_t)w;
	}
	return 0;
}

/* Answers the numbered requests of one connection until the client closes it. */
static void serve(int fd)
{
	char in[4096], out[8192];
	size_t have = 0;
	for (;;) {
		ssize_t r = read(fd, in + have, sizeof(in) - have);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return;
		have += (size_t)r;
		size_t start = 0, olen = 0;
		for (size_t i = 0; i < have; i++) {
			if (in[i] != '\n')
				continue;
			uint64_t n = 0;
			for (size_t j = start; j < i; j++)
				if (in[j] >= '0' && in[j] <= '9')
					n = n * 10 + (uint64_t)(in[j] - '0');
			struct line l = { .len = 0 };
			put_u64(&l, n);
			put_str(&l, " ");
			uint64_t h = mix64(n);
			char hex[17];
			for (int k = 15; k >= 0; k--, h >>= 4)
				hex[k] = "0123456789abcdef"[h & 15];
			hex[16] = 0;
			put_str(&l, hex);
			l.buf[l.len++] = '\n';
			if (olen + l.len > sizeof(out)) {
				if (write_all(fd, out, olen) < 0)
					return;
				olen = 0;
			}
			memcpy(out + olen, l.buf, l.len);
			olen += l.len;
			start = i + 1;
		}
		if (olen > 0 && write_all(fd, out, olen) < 0)
			return;
		if (start == 0 && have == sizeof(in))
			return; /* a line longer than the buffer: not a client of ours */
		memmove(in, in + start, have - start);
		have -= start;
	}
}

static int cmd_net(int argc, char **argv)
{
	uint64_t port = 0;
	for (int i = 0; i < argc; i++) {
		const char *v;
		if ((v = opt_value(argc, argv, &i, "--port")))
			port = parse_num("--port", v, 1, 65535);
		else
			die_usage("unknown argument", argv[i]);
	}
	if (!port)
		die_usage("missing --port", NULL);
	signal(SIGCHLD, SIG_IGN); /* no zombies: nobody waits for the children */
	int s = socket(AF_INET, SOCK_STREAM, 0);
	if (s < 0)
		die_sys("socket");
	int one = 1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die_sys("bind");
	if (listen(s, 16) < 0)
		die_sys("listen");
	say(1, "TANDEM-NET-LISTENING", NULL);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die_sys("accept");
		}
		pid_t pid = fork();
		if (pid == 0) {
			close(s);
			serve(c);
			_exit(0);
		}
		close(c);
	}
}

static int cmd_blob(int argc, char **argv)
{
	uint64_t mib = 0;
	for (int i = 0; i < argc; i++) {
		const char *v;
		if ((v = opt_value(argc, argv, &i, "--mib")))
			mib = parse_num("--mib", v, 1, 4096);
		else
			die_usage("unknown argument", argv[i]);
	}
	if (!mib)
		die_usage("missing --mib", NULL);
	static uint64_t words[8192];
	uint64_t next = 0;
	for (uint64_t chunk = 0; chunk < mib * 16; chunk++) {
		for (size_t i = 0; i < 8192; i++)
			words[i] = mix64(next++); /* x86 is little-endian, as promised */
		if (write_all(1, (const char *)words, sizeof(words)) < 0)
			die_sys("write");
	}
	return 0;
}

/* ---- journal ---- */

#define SECTOR 512

static uint64_t fnv1a(const unsigned char *p, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < len; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

/* Record n as it must be on disk; the host's checker (src/harness/journal.rs)
 * builds the same bytes. */
static void journal_record(uint64_t n, unsigned char *rec)
{
	uint64_t words[SECTOR / 8];
	words[0] = 0x4a444e54; /* "TNDJ" */
	words[1] = n;
	for (size_t i = 2; i < SECTOR / 8 - 1; i++)
		words[i] = mix64(n ^ i);
	memcpy(rec, words, SECTOR - 8);
	uint64_t h = fnv1a(rec, SECTOR - 8);
	memcpy(rec + SECTOR - 8, &h, 8);
}

static int cmd_journal(int argc, char **argv)
{
	const char *device = NULL;
	uint64_t count = 0, burst = 8, interval_ms = 100;
	for (int i = 0; i < argc; i++) {
		const char *v;
		if ((v = opt_value(argc, argv, &i, "--device")))
			device = v;
		else if ((v = opt_value(argc, argv, &i, "--count")))
			count = parse_num("--count", v, 1, 1000000);
		else if ((v = opt_value(argc, argv, &i, "--burst")))
			burst = parse_num("--burst", v, 1, 10000);
		else if ((v = opt_value(argc, argv, &i, "--interval-ms")))
			interval_ms = parse_num("--interval-ms", v, 0, 3600000);
		else
			die_usage("unknown argument", argv[i]);
	}
	if (!device)
		die_usage("missing --device", NULL);
	if (!count)
		die_usage("missing --count", NULL);
	int fd = open(device, O_RDWR | O_DIRECT);
	if (fd < 0)
		die_sys(device);
	/* O_DIRECT wants a buffer aligned to the sector. */
	unsigned char *rec = mmap(NULL, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *want = mmap(NULL, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (rec == MAP_FAILED || want == MAP_FAILED)
		die_sys("mmap");
	say(1, "TANDEM-JOURNAL-START", NULL);
	int64_t next = mono_ns();
	for (uint64_t n = 1; n <= count; n++) {
		journal_record(n, rec);
		if (pwrite(fd, rec, SECTOR, (off_t)(n * SECTOR)) != SECTOR)
			die_sys("pwrite");
		if (fdatasync(fd) != 0)
			die_sys("fdatasync");
		struct line l = { .len = 0 };
		put_str(&l, "journal ");
		put_u64(&l, n);
		emit(1, &l);
		if (n % burst == 0 && interval_ms) {
			next += (int64_t)interval_ms * 1000000LL;
			int64_t now = mono_ns();
			if (next < now)
				next = now;
			sleep_until(next);
		}
	}
	uint64_t ok = 0, bad = 0, first_bad = 0;
	for (uint64_t n = 1; n <= count; n++) {
		journal_record(n, want);
		if (pread(fd, rec, SECTOR, (off_t)(n * SECTOR)) == SECTOR && memcmp(rec, want, SECTOR) == 0) {
			ok++;
		} else {
			if (!bad)
				first_bad = n;
			bad++;
		}
	}
	struct line l = { .len = 0 };
	put_str(&l, "journal-verdict records=");
	put_u64(&l, count);
	put_str(&l, " ok=");
	put_u64(&l, ok);
	put_str(&l, " bad=");
	put_u64(&l, bad);
	put_str(&l, " first_bad=");
	put_u64(&l, first_bad);
	emit(1, &l);
	say(1, bad ? "TANDEM-JOURNAL-BAD" : "TANDEM-JOURNAL-OK", NULL);
	return bad ? 1 : 0;
}

/* ---- diskbench ---- */

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

static int cmd_diskbench(int argc, char **argv)
{
	const char *device = NULL;
	uint64_t writes = 2000, seq_mib = 32;
	for (int i = 0; i < argc; i++) {
		const char *v;
		if ((v = opt_value(argc, argv, &i, "--device")))
			device = v;
		else if ((v = opt_value(argc, argv, &i, "--writes")))
			writes = parse_num("--writes", v, 10, 1000000);
		else if ((v = opt_value(argc, argv, &i, "--seq-mib")))
			seq_mib = parse_num("--seq-mib", v, 1, 4096);
		else
			die_usage("unknown argument", argv[i]);
	}
	if (!device)
		die_usage("missing --device", NULL);
	int fd = open(device, O_RDWR | O_DIRECT);
	if (fd < 0)
		die_sys(device);
	const size_t big = 1 << 20;
	unsigned char *buf = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int64_t *lat = mmap(NULL, writes * sizeof(int64_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED || lat == MAP_FAILED)
		die_sys("mmap");
	for (size_t i = 0; i < big; i++)
		buf[i] = (unsigned char)mix64(i);
	uint64_t x = 0x9e3779b97f4a7c15ULL;
	int64_t began = mono_ns();
	for (uint64_t n = 0; n < writes; n++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		off_t at = (off_t)((x % (64 * 256)) * 4096); /* a 4 KiB block of the first 64 MiB */
		int64_t t = mono_ns();
		if (pwrite(fd, buf + (n % 256) * 4096, 4096, at) != 4096)
			die_sys("pwrite");
		lat[n] = mono_ns() - t;
	}
	int64_t took = mono_ns() - began;
	qsort(lat, writes, sizeof(int64_t), cmp_i64);
	struct line l = { .len = 0 };
	put_str(&l, "diskbench randwrite writes=");
	put_u64(&l, writes);
	put_str(&l, " iops=");
	put_u64(&l, (uint64_t)(writes * 1000000000ULL / (uint64_t)(took > 0 ? took : 1)));
	put_str(&l, " p50_us=");
	put_u64(&l, (uint64_t)lat[writes / 2] / 1000);
	put_str(&l, " p99_us=");
	put_u64(&l, (uint64_t)lat[(writes * 99) / 100] / 1000);
	emit(1, &l);
	began = mono_ns();
	for (uint64_t m = 0; m < seq_mib; m++)
		if (pwrite(fd, buf, big, (off_t)(m * big)) != (ssize_t)big)
			die_sys("pwrite");
	if (fdatasync(fd) != 0)
		die_sys("fdatasync");
	took = mono_ns() - began;
	put_str(&l, "diskbench seqwrite mib=");
	put_u64(&l, seq_mib);
	put_str(&l, " mb_s=");
	put_u64(&l, (uint64_t)(seq_mib * 1048576ULL * 1000ULL / (uint64_t)(took > 0 ? took : 1)));
	put_str(&l, " ms=");
	put_u64(&l, (uint64_t)(took / 1000000));
	emit(1, &l);
	say(1, "TANDEM-DISKBENCH-DONE", NULL);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		die_usage("missing subcommand", NULL);
	if (strcmp(argv[1], "ticker") == 0)
		return cmd_ticker(argc - 2, argv + 2);
	if (strcmp(argv[1], "dirty") == 0)
		return cmd_dirty(argc - 2, argv + 2);
	if (strcmp(argv[1], "net") == 0)
		return cmd_net(argc - 2, argv + 2);
	if (strcmp(argv[1], "blob") == 0)
		return cmd_blob(argc - 2, argv + 2);
	if (strcmp(argv[1], "journal") == 0)
		return cmd_journal(argc - 2, argv + 2);
	if (strcmp(argv[1], "diskbench") == 0)
		return cmd_diskbench(argc - 2, argv + 2);
	if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
		usage();
		return 0;
	}
	die_usage("unknown subcommand", argv[1]);
	return 2;
}
