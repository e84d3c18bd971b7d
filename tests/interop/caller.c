/*
 * caller.c - a one-touch caller on a serial line, written from
 * firmware_protocol/SPEC.md alone (wire protocol version 1).
 *
 *   caller PORT DEVICE_ID KEY_HEX KEY_NAME COUNTER
 *   caller selftest
 *
 * PORT      serial device or pseudo-terminal, opened raw at 9600 8N1
 * DEVICE_ID 1..4294967295 (decimal)
 * KEY_HEX   the 16-byte device key as 32 hex digits
 * KEY_NAME  call | hangup | up | down
 * COUNTER   the uplink counter of the KEY frame, 1..4294967295; CALLER_ACKs
 *           use COUNTER+1, COUNTER+2, ...
 *
 * Environment (optional):
 * CALLER_LINGER_S  seconds to keep listening after the ACK, answering each
 *                  FEEDBACK with a CALLER_ACK (default 0: exit at once)
 * CALLER_DEBUG     if set, log every rejected/ignored frame on stderr
 *
 * Exit: 0 ACKed, 1 no ACK within 10 s (or an I/O error), 2 usage error;
 * selftest: 0 all checks pass, 1 otherwise.
 *
 * Choices where SPEC.md leaves room are marked "CHOICE:".
 *
 * Compile: gcc -std=c99 -Wall -Wextra -Werror -O2 -o caller caller.c
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* SHA-256 (FIPS 180-4)                                                */
/* ------------------------------------------------------------------ */

typedef struct {
    uint32_t h[8];
    uint64_t total;   /* bytes hashed so far */
    uint8_t block[64];
    size_t used;
} sha256_ctx;

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

static uint32_t ror32(uint32_t x, unsigned n) { return (x >> n) | (x << (32 - n)); }

static void sha256_compress(sha256_ctx *c, const uint8_t *p)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++) {
        w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) |
               ((uint32_t)p[4 * i + 2] << 8) | (uint32_t)p[4 * i + 3];
    }
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = c->h[0], b = c->h[1], cc = c->h[2], d = c->h[3];
    uint32_t e = c->h[4], f = c->h[5], g = c->h[6], h = c->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t S1 = ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25);
        uint32_t ch = (e & f) ^ (~e & g);
        uint32_t t1 = h + S1 + ch + K256[i] + w[i];
        uint32_t S0 = ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22);
        uint32_t mj = (a & b) ^ (a & cc) ^ (b & cc);
        uint32_t t2 = S0 + mj;
        h = g; g = f; f = e; e = d + t1;
        d = cc; cc = b; b = a; a = t1 + t2;
    }
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d;
    c->h[4] += e; c->h[5] += f; c->h[6] += g; c->h[7] += h;
}

static void sha256_init(sha256_ctx *c)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, iv, sizeof iv);
    c->total = 0;
    c->used = 0;
}

static void sha256_update(sha256_ctx *c, const uint8_t *p, size_t n)
{
    c->total += n;
    while (n > 0) {
        size_t take = 64 - c->used;
        if (take > n) take = n;
        memcpy(c->block + c->used, p, take);
        c->used += take;
        p += take;
        n -= take;
        if (c->used == 64) {
            sha256_compress(c, c->block);
            c->used = 0;
        }
    }
}

static void sha256_final(sha256_ctx *c, uint8_t out[32])
{
    uint64_t bits = c->total * 8;
    uint8_t pad = 0x80;
    sha256_update(c, &pad, 1);
    pad = 0;
    while (c->used != 56) sha256_update(c, &pad, 1);
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(c, len, 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)c->h[i];
    }
}

static void sha256(const uint8_t *p, size_t n, uint8_t out[32])
{
    sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, p, n);
    sha256_final(&c, out);
}

/* HMAC-SHA256 (RFC 2104) */
static void hmac_sha256(const uint8_t *key, size_t klen, const uint8_t *msg, size_t mlen,
                        uint8_t out[32])
{
    uint8_t k0[64], ipad[64], opad[64], inner[32];
    memset(k0, 0, sizeof k0);
    if (klen > 64) {
        sha256(key, klen, k0);
    } else {
        memcpy(k0, key, klen);
    }
    for (int i = 0; i < 64; i++) {
        ipad[i] = (uint8_t)(k0[i] ^ 0x36);
        opad[i] = (uint8_t)(k0[i] ^ 0x5c);
    }
    sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, ipad, 64);
    sha256_update(&c, msg, mlen);
    sha256_final(&c, inner);
    sha256_init(&c);
    sha256_update(&c, opad, 64);
    sha256_update(&c, inner, 32);
    sha256_final(&c, out);
}

/* ------------------------------------------------------------------ */
/* CRC-16/IBM-3740 (CCITT-FALSE), SPEC section 6                       */
/* ------------------------------------------------------------------ */

static uint16_t crc16(const uint8_t *data, size_t len)
{
    uint16_t crc = 0xFFFF;
    while (len--) {
        crc ^= (uint16_t)(*data++) << 8;
        for (int bit = 0; bit < 8; bit++) {
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
        }
    }
    return crc;
}

/* The table form of section 6, used only to cross-check in the selftest. */
static uint16_t crc16_table_form(const uint8_t *data, size_t len)
{
    static uint16_t table[256];
    static int ready = 0;
    if (!ready) {
        for (int b = 0; b < 256; b++) {
            uint16_t crc = (uint16_t)(b << 8);
            for (int bit = 0; bit < 8; bit++) {
                crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
            }
            table[b] = crc;
        }
        ready = 1;
    }
    uint16_t crc = 0xFFFF;
    while (len--) crc = (uint16_t)((crc << 8) ^ table[((crc >> 8) ^ *data++) & 0xFF]);
    return crc;
}

/* ------------------------------------------------------------------ */
/* Frames, SPEC sections 4, 5, 7, 8                                    */
/* ------------------------------------------------------------------ */

enum {
    SYNC0 = 0xa5,
    SYNC1 = 0x5a,
    PROTO_VERSION = 1,
    T_KEY = 0x01,
    T_HEARTBEAT = 0x02,
    T_CALLER_ACK = 0x03,
    T_ACK = 0x81,
    T_FEEDBACK = 0x82,
    HDR_LEN = 13,     /* SYNC .. LENGTH */
    MAC_LEN = 8,
    OVERHEAD = 23,    /* 13 header + 8 MAC + 2 CRC */
    MAX_PAYLOAD = 64,
    MAX_FRAME = OVERHEAD + MAX_PAYLOAD /* 87 */
};

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_u32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void compute_mac(const uint8_t key[16], const uint8_t *frame, size_t payload_len,
                        uint8_t mac[MAC_LEN])
{
    uint8_t full[32];
    /* offsets 2 .. 12+L inclusive = 11 + L bytes */
    hmac_sha256(key, 16, frame + 2, 11 + payload_len, full);
    memcpy(mac, full, MAC_LEN);
}

/* Builds a complete frame into out (at least MAX_FRAME bytes); returns its length. */
static size_t build_frame(uint8_t *out, uint8_t type, uint32_t device_id, uint32_t counter,
                          const uint8_t *payload, uint8_t len, const uint8_t key[16])
{
    out[0] = SYNC0;
    out[1] = SYNC1;
    out[2] = PROTO_VERSION;
    out[3] = type;
    put_u32(out + 4, device_id);
    put_u32(out + 8, counter);
    out[12] = len;
    if (len) memcpy(out + HDR_LEN, payload, len);
    compute_mac(key, out, len, out + HDR_LEN + len);
    uint16_t crc = crc16(out + 2, 19u + len);
    out[21 + len] = (uint8_t)(crc >> 8);
    out[22 + len] = (uint8_t)crc;
    return OVERHEAD + (size_t)len;
}

/* Rejection reasons (section 13.2) plus caller-local "ignored" outcomes. */
enum reason {
    RX_OK = 0,
    RX_GARBAGE,
    RX_TOO_LONG,
    RX_BAD_CRC,
    RX_BAD_VERSION,
    RX_UNKNOWN_TYPE,
    RX_MALFORMED,
    RX_TRUNCATED,
    RX_BAD_MAC,
    RX_REPLAY,
    RX_IGN_UPLINK,      /* wrong_direction: a caller ignores uplink frames silently */
    RX_IGN_OTHER_DEVICE,
    RX_COUNT
};

static const char *const REASON_NAME[RX_COUNT] = {
    "ok",        "garbage",   "too_long",      "bad_crc",         "bad_version",
    "unknown_type", "malformed", "truncated", "bad_mac",     "replay",
    "ignored_uplink", "ignored_other_device"};

static const char *const STATE_NAME[] = {"IDLE",      "RECEIVED", "HELP_COMING", "ON_SITE",
                                         "CANCELLED", "THANKS",   "STILL_TRYING"};
static const char *const COLOR_NAME[] = {"OFF", "GREEN", "RED", "AMBER", "BLUE"};
static const char *const PATTERN_NAME[] = {"OFF", "STEADY", "SLOW_BLINK", "FAST_BLINK"};
static const char *const BUZZER_NAME[] = {"SILENT", "SHORT", "DOUBLE", "LONG"};

/* Section 13.1 step 4: VERSION, TYPE, COUNTER, LENGTH and payload fields. */
static enum reason check_structure(const uint8_t *f)
{
    uint8_t len = f[12];
    const uint8_t *p = f + HDR_LEN;
    if (f[2] != PROTO_VERSION) return RX_BAD_VERSION;
    switch (f[3]) {
    case T_KEY: case T_HEARTBEAT: case T_CALLER_ACK: case T_ACK: case T_FEEDBACK: break;
    default: return RX_UNKNOWN_TYPE;
    }
    if (get_u32(f + 8) == 0) return RX_MALFORMED;
    /* CHOICE: device id 0 is "never assigned" (section 4) but is not listed as
     * malformed; a caller never has id 0, so such a frame is simply ignored later. */
    switch (f[3]) {
    case T_KEY:
        if (len != 1 || p[0] < 1 || p[0] > 4) return RX_MALFORMED;
        break;
    case T_HEARTBEAT:
        if (len != 5) return RX_MALFORMED;
        if (p[2] > 100 && p[2] != 0xFF) return RX_MALFORMED;
        if (p[4] & 0xFC) return RX_MALFORMED;
        break;
    case T_CALLER_ACK:
        /* CHOICE: acked_counter 0 names no frame (counter 0 is reserved): malformed. */
        if (len != 4 || get_u32(p) == 0) return RX_MALFORMED;
        break;
    case T_ACK:
        /* status: only 0 (STORED) is defined; "other values reserved" => malformed. */
        if (len != 5 || get_u32(p) == 0 || p[4] != 0) return RX_MALFORMED;
        break;
    case T_FEEDBACK:
        if (len != 6 || p[0] > 6 || p[1] > 4 || p[2] > 3 || p[3] > 3) return RX_MALFORMED;
        break;
    default:
        return RX_UNKNOWN_TYPE;
    }
    return RX_OK;
}

/* ------------------------------------------------------------------ */
/* Receiver: finding frames in a byte stream, section 13.1             */
/* ------------------------------------------------------------------ */

typedef struct {
    uint8_t buf[MAX_FRAME]; /* "87 bytes suffice" */
    size_t n;
    unsigned counts[RX_COUNT];
    int debug;
} rx_t;

static void rx_note(rx_t *rx, enum reason r, size_t nbytes)
{
    rx->counts[r]++;
    if (rx->debug) fprintf(stderr, "caller: rx %s (%zu bytes)\n", REASON_NAME[r], nbytes);
}

static void rx_drop(rx_t *rx, size_t k)
{
    if (k > rx->n) k = rx->n;
    memmove(rx->buf, rx->buf + k, rx->n - k);
    rx->n -= k;
}

/* Free space for new bytes. */
static size_t rx_room(const rx_t *rx) { return sizeof rx->buf - rx->n; }

static void rx_push(rx_t *rx, const uint8_t *p, size_t k)
{
    if (k > rx_room(rx)) k = rx_room(rx); /* callers never push more than rx_room() */
    memcpy(rx->buf + rx->n, p, k);
    rx->n += k;
}

/*
 * Extracts the next frame that passes steps 1-4 into out; returns its length,
 * or 0 when more bytes are needed. Rejections are counted in rx->counts.
 */
static size_t rx_next(rx_t *rx, uint8_t *out)
{
    for (;;) {
        /* step 1: hunt for a5 5a */
        size_t i = 0;
        while (i + 1 < rx->n && !(rx->buf[i] == SYNC0 && rx->buf[i + 1] == SYNC1)) i++;
        if (i + 1 >= rx->n) {
            /* no SYNC: keep a final a5 only */
            size_t keep = (rx->n > 0 && rx->buf[rx->n - 1] == SYNC0) ? 1 : 0;
            if (rx->n - keep > 0) {
                rx_note(rx, RX_GARBAGE, rx->n - keep);
                rx_drop(rx, rx->n - keep);
            }
            return 0;
        }
        if (i > 0) {
            rx_note(rx, RX_GARBAGE, i);
            rx_drop(rx, i);
        }
        /* step 2 */
        if (rx->n < HDR_LEN) return 0;
        uint8_t len = rx->buf[12];
        if (len > MAX_PAYLOAD) {
            rx_note(rx, RX_TOO_LONG, 1);
            rx_drop(rx, 1);
            continue;
        }
        /* step 3 */
        size_t flen = OVERHEAD + (size_t)len;
        if (rx->n < flen) return 0;
        uint16_t want = crc16(rx->buf + 2, 19u + len);
        uint16_t got = (uint16_t)((rx->buf[21 + len] << 8) | rx->buf[22 + len]);
        if (want != got) {
            rx_note(rx, RX_BAD_CRC, 1);
            rx_drop(rx, 1);
            continue;
        }
        /* step 4 */
        memcpy(out, rx->buf, flen);
        rx_drop(rx, flen);
        enum reason r = check_structure(out);
        if (r != RX_OK) {
            rx_note(rx, r, flen);
            continue;
        }
        return flen;
    }
}

/* The line went idle inside a frame: treat it as a bad CRC (drop one byte). */
static void rx_idle(rx_t *rx)
{
    if (rx->n > 0) {
        rx_note(rx, RX_TRUNCATED, 1);
        rx_drop(rx, 1);
    }
}

/* ------------------------------------------------------------------ */
/* Caller-side receive checks (section 13.1 step 5)                    */
/* ------------------------------------------------------------------ */

typedef struct {
    uint32_t device_id;
    uint8_t key[16];
    uint32_t downlink_mark; /* high-water mark of accepted downlink counters, RAM only */
} caller_id_t;

/* Direction, device id, MAC, counter. Raises the mark on acceptance. */
static enum reason caller_accept(caller_id_t *me, const uint8_t *f)
{
    uint8_t len = f[12];
    if (!(f[3] & 0x80)) return RX_IGN_UPLINK;
    if (get_u32(f + 4) != me->device_id) return RX_IGN_OTHER_DEVICE;
    uint8_t mac[MAC_LEN];
    compute_mac(me->key, f, len, mac);
    uint8_t diff = 0;
    for (int i = 0; i < MAC_LEN; i++) diff |= (uint8_t)(mac[i] ^ f[HDR_LEN + len + i]);
    if (diff) return RX_BAD_MAC;
    uint32_t ctr = get_u32(f + 8);
    /* CHOICE: no optional duplicate window (section 9); anything not above the mark is
     * a replay. The mark is raised by every accepted downlink frame, ACK or FEEDBACK. */
    if (ctr <= me->downlink_mark) return RX_REPLAY;
    me->downlink_mark = ctr;
    return RX_OK;
}

/* ------------------------------------------------------------------ */
/* Time, randomness, serial port                                       */
/* ------------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t rng_state;

static void rng_seed(void)
{
    uint64_t s = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd >= 0) {
        if (read(fd, &s, sizeof s) != (ssize_t)sizeof s) s = 0;
        close(fd);
    }
    if (s == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        s = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 16);
    }
    rng_state = s ? s : 0x9E3779B97F4A7C15ull;
}

/* uniform in [0, 1) */
static double rng_unit(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545F4914F6CDD1Dull;
    return (double)(r >> 11) / 9007199254740992.0;
}

#define CHAR_TIME_S (10.0 / 9600.0) /* 1.04 ms */
#define ACK_TIMEOUT_S 1.0
#define TOTAL_LIMIT_S 10.0
#define IDLE_FLUSH_S (20 * CHAR_TIME_S)

/* Bus idle before transmitting: 3 character times + uniform 0..20 ms (section 3.1). */
static double draw_idle_requirement(void) { return 3 * CHAR_TIME_S + 0.020 * rng_unit(); }

/* Back-off before repeat n: min(8, 0.5 * 2^n) plus 0..50 % jitter (section 10.2). */
static double draw_backoff(unsigned n)
{
    double b = n >= 4 ? 8.0 : 0.5 * (double)(1u << n);
    if (b > 8.0) b = 8.0;
    return b + b * 0.5 * rng_unit();
}

static int open_port(const char *path)
{
    int fd = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return -1;
    struct termios t;
    if (tcgetattr(fd, &t) != 0) {
        close(fd);
        return -1;
    }
    t.c_iflag &= (tcflag_t) ~(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON |
                             IXOFF | IXANY | INPCK);
    t.c_oflag &= (tcflag_t)~OPOST;
    t.c_lflag &= (tcflag_t) ~(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
    t.c_cflag &= (tcflag_t) ~(CSIZE | PARENB | CSTOPB);
#ifdef CRTSCTS
    t.c_cflag &= (tcflag_t)~CRTSCTS;
#endif
    t.c_cflag |= CS8 | CREAD | CLOCAL;
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    if (cfsetispeed(&t, B9600) != 0 || cfsetospeed(&t, B9600) != 0 ||
        tcsetattr(fd, TCSANOW, &t) != 0) {
        close(fd);
        return -1;
    }
    /* CHOICE: discard whatever was queued before we started ("power-up"). */
    tcflush(fd, TCIOFLUSH);
    return fd;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                struct pollfd pfd = {fd, POLLOUT, 0};
                poll(&pfd, 1, 100);
                continue;
            }
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    /* back-to-back bytes, then release the bus once the last CRC byte is out */
    tcdrain(fd);
    return 0;
}

/* ------------------------------------------------------------------ */
/* The caller                                                          */
/* ------------------------------------------------------------------ */

typedef struct {
    int fd;
    caller_id_t me;
    rx_t rx;
    double last_rx;        /* time the last byte was heard on the line */
    uint32_t next_counter; /* next uplink counter to assign */

    /* the pending KEY frame */
    uint8_t key_frame[MAX_FRAME];
    size_t key_len;
    uint32_t key_counter;
    int pending;           /* sent at least once, not yet acknowledged */
    int acked;
    uint32_t ack_dl_counter;
    uint8_t ack_status;

    /* feedback */
    int fb_held;           /* a FEEDBACK whose CALLER_ACK waits for the KEY (rule 3) */
    uint32_t fb_held_counter;
    int fb_shown;
    uint8_t fb_payload[6]; /* the payload of the FEEDBACK being shown */
    int io_error;
} caller_t;

static void send_caller_ack(caller_t *c, uint32_t acked_counter);

static void on_frame(caller_t *c, const uint8_t *f)
{
    enum reason r = caller_accept(&c->me, f);
    if (r != RX_OK) {
        rx_note(&c->rx, r, OVERHEAD + (size_t)f[12]);
        return;
    }
    uint32_t ctr = get_u32(f + 8);
    const uint8_t *p = f + HDR_LEN;
    if (f[3] == T_ACK) {
        uint32_t acked = get_u32(p);
        if (c->pending && !c->acked && acked == c->key_counter) {
            c->acked = 1;
            c->pending = 0;
            c->ack_dl_counter = ctr;
            c->ack_status = p[4];
        } else if (c->rx.debug) {
            fprintf(stderr, "caller: ACK dl=%u for counter %u ignored (not pending)\n",
                    (unsigned)ctr, (unsigned)acked);
        }
        return;
    }
    /* FEEDBACK */
    int repeat = c->fb_shown && memcmp(c->fb_payload, p, 6) == 0;
    printf("FEEDBACK downlink_counter=%u state=%s led=%s/%s buzzer=%s hold_s=%u%s\n",
           (unsigned)ctr, STATE_NAME[p[0]], COLOR_NAME[p[1]], PATTERN_NAME[p[2]],
           BUZZER_NAME[p[3]], (unsigned)((p[4] << 8) | p[5]),
           repeat ? " (same payload: buzzer not replayed)" : "");
    fflush(stdout);
    memcpy(c->fb_payload, p, 6);
    c->fb_shown = 1;
    if (c->pending) {
        /* rule 3: nothing else while a KEY is pending; remember the newest only */
        c->fb_held = 1;
        c->fb_held_counter = ctr;
    } else {
        send_caller_ack(c, ctr);
    }
}

/* Reads what is available (waiting at most timeout_s) and handles complete frames. */
static void pump(caller_t *c, double timeout_s)
{
    if (timeout_s < 0) timeout_s = 0;
    /* an incomplete frame is flushed after 20 character times of silence */
    if (c->rx.n > 0) {
        double flush_at = c->last_rx + IDLE_FLUSH_S - now_s();
        if (flush_at < timeout_s) timeout_s = flush_at < 0 ? 0 : flush_at;
    }
    struct pollfd pfd = {c->fd, POLLIN, 0};
    int ms = (int)(timeout_s * 1000.0 + 0.999);
    int pr = poll(&pfd, 1, ms);
    if (pr < 0) {
        if (errno != EINTR) c->io_error = 1;
        return;
    }
    if (pr > 0 && (pfd.revents & (POLLERR | POLLNVAL))) {
        c->io_error = 1;
        return;
    }
    if (pr > 0 && (pfd.revents & (POLLIN | POLLHUP))) {
        uint8_t tmp[MAX_FRAME];
        uint8_t frame[MAX_FRAME];
        ssize_t got = read(c->fd, tmp, rx_room(&c->rx));
        if (got > 0) {
            c->last_rx = now_s();
            size_t off = 0;
            while (off < (size_t)got) {
                size_t take = (size_t)got - off;
                if (take > rx_room(&c->rx)) take = rx_room(&c->rx);
                rx_push(&c->rx, tmp + off, take);
                off += take;
                size_t flen;
                while ((flen = rx_next(&c->rx, frame)) > 0) on_frame(c, frame);
            }
        } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
            /* pty peer gone: avoid a busy loop */
            struct timespec ts = {0, 20 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        return;
    }
    if (c->rx.n > 0 && now_s() - c->last_rx >= IDLE_FLUSH_S) {
        uint8_t frame[MAX_FRAME];
        rx_idle(&c->rx);
        size_t flen;
        while ((flen = rx_next(&c->rx, frame)) > 0) on_frame(c, frame);
    }
}

/* Waits until the bus has been idle long enough, then transmits. */
static int transmit(caller_t *c, const uint8_t *frame, size_t len, double hard_deadline)
{
    double need = draw_idle_requirement();
    for (;;) {
        double t = now_s();
        if (t >= hard_deadline) return -1;
        double quiet = t - c->last_rx;
        if (quiet >= need) break;
        pump(c, need - quiet);
        if (c->io_error) return -1;
        if (c->acked) return 1; /* an ACK arrived while waiting for the bus */
    }
    if (write_all(c->fd, frame, len) != 0) {
        c->io_error = 1;
        return -1;
    }
    return 0;
}

static void send_caller_ack(caller_t *c, uint32_t acked_counter)
{
    if (c->next_counter == 0) {
        fprintf(stderr, "caller: uplink counter exhausted, CALLER_ACK not sent\n");
        return;
    }
    uint8_t payload[4], frame[MAX_FRAME];
    put_u32(payload, acked_counter);
    uint32_t ctr = c->next_counter;
    size_t len = build_frame(frame, T_CALLER_ACK, c->me.device_id, ctr, payload, 4, c->me.key);
    c->next_counter++; /* wraps to 0 at the top: then nothing more is sent */
    double need = draw_idle_requirement();
    while (now_s() - c->last_rx < need) {
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
        /* CHOICE: while waiting to send a CALLER_ACK we do not parse new frames
         * (that would recurse into on_frame); the wait is at most ~23 ms. */
        struct pollfd pfd = {c->fd, POLLIN, 0};
        if (poll(&pfd, 1, 0) > 0 && (pfd.revents & POLLIN) && rx_room(&c->rx) > 0) {
            uint8_t tmp[MAX_FRAME];
            ssize_t got = read(c->fd, tmp, rx_room(&c->rx));
            if (got > 0) {
                rx_push(&c->rx, tmp, (size_t)got);
                c->last_rx = now_s();
            }
        }
    }
    if (write_all(c->fd, frame, len) != 0) {
        c->io_error = 1;
        return;
    }
    printf("CALLER_ACK counter=%u acked_counter=%u\n", (unsigned)ctr, (unsigned)acked_counter);
    fflush(stdout);
}

static int parse_u32(const char *s, uint32_t *out)
{
    if (!s || !*s) return -1;
    uint64_t v = 0;
    for (const char *q = s; *q; q++) {
        if (*q < '0' || *q > '9') return -1;
        v = v * 10 + (uint64_t)(*q - '0');
        if (v > 0xFFFFFFFFull) return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static int parse_key(const char *s, uint8_t key[16])
{
    if (strlen(s) != 32) return -1;
    for (int i = 0; i < 16; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0) return -1;
        key[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}

static int key_code(const char *name)
{
    static const char *const names[] = {"call", "hangup", "up", "down"};
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0) return i + 1;
    return -1;
}

static int usage(const char *msg)
{
    fprintf(stderr,
            "caller: %s\n"
            "usage: caller PORT DEVICE_ID KEY_HEX KEY_NAME COUNTER\n"
            "       caller selftest\n"
            "  DEVICE_ID, COUNTER: 1..4294967295; KEY_HEX: 32 hex digits;\n"
            "  KEY_NAME: call | hangup | up | down\n",
            msg);
    return 2;
}

static int run_caller(int argc, char **argv)
{
    if (argc != 6) return usage("wrong number of arguments");
    static caller_t c;
    memset(&c, 0, sizeof c);
    if (parse_u32(argv[2], &c.me.device_id) != 0 || c.me.device_id == 0)
        return usage("DEVICE_ID must be a decimal number 1..4294967295");
    if (parse_key(argv[3], c.me.key) != 0) return usage("KEY_HEX must be exactly 32 hex digits");
    int code = key_code(argv[4]);
    if (code < 0) return usage("KEY_NAME must be call, hangup, up or down");
    if (parse_u32(argv[5], &c.key_counter) != 0 || c.key_counter == 0)
        return usage("COUNTER must be a decimal number 1..4294967295");
    double linger = 0;
    const char *ls = getenv("CALLER_LINGER_S");
    if (ls && *ls) {
        char *end;
        linger = strtod(ls, &end);
        if (*end || linger < 0 || linger > 600) return usage("CALLER_LINGER_S must be 0..600");
    }
    c.rx.debug = getenv("CALLER_DEBUG") != NULL;
    rng_seed();

    c.fd = open_port(argv[1]);
    if (c.fd < 0) {
        fprintf(stderr, "caller: cannot open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    uint8_t kp = (uint8_t)code;
    c.key_len = build_frame(c.key_frame, T_KEY, c.me.device_id, c.key_counter, &kp, 1, c.me.key);
    c.next_counter = c.key_counter + 1; /* 0 after 0xFFFFFFFF: exhausted */

    double start = now_s();
    double deadline = start + TOTAL_LIMIT_S;
    c.last_rx = start; /* CHOICE: the line counts as busy until we have heard it idle */
    unsigned repeats = 0;
    double next_due = start;

    while (!c.acked) {
        double t = now_s();
        if (t >= deadline || c.io_error) break;
        if (t >= next_due) {
            int r = transmit(&c, c.key_frame, c.key_len, deadline);
            if (r < 0) break;
            if (r > 0) break; /* acked while waiting for the bus */
            if (!c.pending && c.rx.debug) fprintf(stderr, "caller: KEY sent\n");
            c.pending = 1;
            if (c.rx.debug && repeats > 0) fprintf(stderr, "caller: repeat %u sent\n", repeats);
            /* ACK timeout counted from the end of the transmission, then back-off */
            next_due = now_s() + ACK_TIMEOUT_S + draw_backoff(repeats);
            repeats++;
            continue;
        }
        double wait = next_due - t;
        if (deadline - t < wait) wait = deadline - t;
        pump(&c, wait);
    }

    if (!c.acked) {
        if (c.io_error)
            fprintf(stderr, "caller: I/O error on %s: %s\n", argv[1], strerror(errno));
        fprintf(stderr,
                "caller: no ACK for counter %u after %.0f s (%u transmissions); "
                "rejected downlink frames: bad_crc=%u bad_mac=%u replay=%u malformed=%u\n",
                (unsigned)c.key_counter, TOTAL_LIMIT_S, repeats, c.rx.counts[RX_BAD_CRC],
                c.rx.counts[RX_BAD_MAC], c.rx.counts[RX_REPLAY], c.rx.counts[RX_MALFORMED]);
        close(c.fd);
        return 1;
    }

    printf("ACK counter=%u downlink_counter=%u status=%u\n", (unsigned)c.key_counter,
           (unsigned)c.ack_dl_counter, (unsigned)c.ack_status);
    fflush(stdout);

    /* rule 3: held CALLER_ACK, for the newest accepted FEEDBACK only */
    if (c.fb_held) {
        c.fb_held = 0;
        send_caller_ack(&c, c.fb_held_counter);
    }
    if (linger > 0) {
        double end = now_s() + linger;
        while (!c.io_error) {
            double left = end - now_s();
            if (left <= 0) break;
            pump(&c, left);
        }
    }
    close(c.fd);
    return 0;
}

/* ------------------------------------------------------------------ */
/* selftest                                                            */
/* ------------------------------------------------------------------ */

static int failures = 0;

static void hexdump(const char *label, const uint8_t *p, size_t n)
{
    printf("  %s:", label);
    for (size_t i = 0; i < n; i++) printf(" %02x", p[i]);
    printf("\n");
}

static void check_bytes(const char *name, const uint8_t *got, size_t gn, const uint8_t *want,
                        size_t wn)
{
    if (gn == wn && memcmp(got, want, wn) == 0) {
        printf("OK   %s\n", name);
        return;
    }
    failures++;
    printf("FAIL %s\n", name);
    hexdump("want", want, wn);
    hexdump("got ", got, gn);
}

static void check_true(const char *name, int ok)
{
    printf("%s %s\n", ok ? "OK  " : "FAIL", name);
    if (!ok) failures++;
}

static const uint8_t EX_KEY[16] = {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
                                   0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f};

/* Section 12, copied from SPEC.md */
static const uint8_t EX1[] = {0xa5, 0x5a, 0x01, 0x01, 0x00, 0x00, 0x03, 0xe9, 0x00, 0x00, 0x00, 0x01,
                              0x01, 0x01, 0xe0, 0xb6, 0xdc, 0x63, 0xcb, 0x57, 0x7f, 0x3b, 0x51, 0x4b};
static const uint8_t EX2[] = {0xa5, 0x5a, 0x01, 0x02, 0x00, 0x00, 0x03, 0xe9, 0x00, 0x00,
                              0x00, 0x02, 0x05, 0x0b, 0xb8, 0x57, 0xb9, 0x00, 0x3f, 0xa8,
                              0x95, 0xc8, 0x2a, 0x8b, 0xe7, 0xaf, 0xae, 0x61};
static const uint8_t EX3[] = {0xa5, 0x5a, 0x01, 0x81, 0x00, 0x00, 0x03, 0xe9, 0x00, 0x00,
                              0x00, 0x01, 0x05, 0x00, 0x00, 0x00, 0x01, 0x00, 0x1a, 0x83,
                              0x40, 0x7e, 0xfa, 0x2b, 0xec, 0xa4, 0x0c, 0x70};
static const uint8_t EX4[] = {0xa5, 0x5a, 0x01, 0x82, 0x00, 0x00, 0x03, 0xe9, 0x00, 0x00,
                              0x00, 0x02, 0x06, 0x02, 0x01, 0x01, 0x01, 0x00, 0x00, 0x0c,
                              0x1a, 0xeb, 0xdd, 0x32, 0xed, 0x42, 0xf8, 0x3b, 0xef};
static const uint8_t EX5[] = {0xa5, 0x5a, 0x01, 0x03, 0x00, 0x00, 0x03, 0xe9, 0x00,
                              0x00, 0x00, 0x03, 0x04, 0x00, 0x00, 0x00, 0x02, 0xf3,
                              0xe7, 0x9d, 0x30, 0x20, 0x97, 0x71, 0x2f, 0xed, 0x09};
static const uint8_t EX6[] = {0xa5, 0x5a, 0x01, 0x01, 0x00, 0x00, 0x03, 0xe9, 0x00, 0x00, 0x00, 0x01,
                              0x01, 0x03, 0xe0, 0xb6, 0xdc, 0x63, 0xcb, 0x57, 0x7f, 0x3b, 0x51, 0x4b};

static int run_selftest(void)
{
    uint8_t buf[MAX_FRAME], out[32];
    size_t n;

    /* CRC check value, section 6 */
    const uint8_t *check = (const uint8_t *)"123456789";
    uint16_t cv = crc16(check, 9);
    printf("%s crc16(\"123456789\") = 0x%04X (spec: 0x29B1)\n", cv == 0x29B1 ? "OK  " : "FAIL",
           cv);
    if (cv != 0x29B1) failures++;
    check_true("table-form CRC equals bitwise CRC", crc16_table_form(check, 9) == cv &&
                                                       crc16_table_form(EX4 + 2, 25) ==
                                                           crc16(EX4 + 2, 25));

    /* SHA-256 / HMAC-SHA256 known answers (FIPS 180-2 "abc", RFC 4231 case 2) */
    static const uint8_t abc_digest[32] = {
        0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22,
        0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00,
        0x15, 0xad};
    sha256((const uint8_t *)"abc", 3, out);
    check_bytes("sha256(\"abc\")", out, 32, abc_digest, 32);
    static const uint8_t rfc4231_2[32] = {
        0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95, 0x75,
        0xc7, 0x5a, 0x00, 0x3f, 0x08, 0x9d, 0x27, 0x39, 0x83, 0x9d, 0xec, 0x58, 0xb9, 0x64, 0xec,
        0x38, 0x43};
    hmac_sha256((const uint8_t *)"Jefe", 4, (const uint8_t *)"what do ya want for nothing?", 28,
                out);
    check_bytes("hmac_sha256 RFC 4231 test case 2", out, 32, rfc4231_2, 32);

    /* Example 1: KEY CALL, counter 1 */
    uint8_t k = 1;
    n = build_frame(buf, T_KEY, 1001, 1, &k, 1, EX_KEY);
    check_bytes("example 1 (KEY CALL, counter 1)", buf, n, EX1, sizeof EX1);

    /* Example 2: HEARTBEAT 3000 mV, 87 %, -71 dBm, flags 0, counter 2 */
    int8_t dbm = -71;
    uint8_t hb[5] = {0x0b, 0xb8, 87, (uint8_t)dbm, 0x00};
    n = build_frame(buf, T_HEARTBEAT, 1001, 2, hb, 5, EX_KEY);
    check_bytes("example 2 (HEARTBEAT, counter 2)", buf, n, EX2, sizeof EX2);

    /* Example 3: ACK of uplink 1, downlink counter 1, STORED */
    uint8_t ack[5];
    put_u32(ack, 1);
    ack[4] = 0;
    n = build_frame(buf, T_ACK, 1001, 1, ack, 5, EX_KEY);
    check_bytes("example 3 (ACK of 1, downlink counter 1)", buf, n, EX3, sizeof EX3);

    /* Example 4: FEEDBACK HELP_COMING GREEN STEADY SHORT hold 0, downlink counter 2 */
    uint8_t fb[6] = {2, 1, 1, 1, 0, 0};
    n = build_frame(buf, T_FEEDBACK, 1001, 2, fb, 6, EX_KEY);
    check_bytes("example 4 (FEEDBACK HELP_COMING, downlink counter 2)", buf, n, EX4, sizeof EX4);

    /* Example 5: CALLER_ACK of downlink 2 with uplink counter 3 */
    uint8_t ca[4];
    put_u32(ca, 2);
    n = build_frame(buf, T_CALLER_ACK, 1001, 3, ca, 4, EX_KEY);
    check_bytes("example 5 (CALLER_ACK of 2, counter 3)", buf, n, EX5, sizeof EX5);

    /* Example 6: bit flip -> computed CRC 0x972C, rejected as bad_crc */
    uint16_t c6 = crc16(EX6 + 2, 20);
    printf("%s example 6 computed CRC = 0x%04X (spec: 0x972C)\n", c6 == 0x972C ? "OK  " : "FAIL",
           c6);
    if (c6 != 0x972C) failures++;
    {
        static rx_t rx;
        memset(&rx, 0, sizeof rx);
        rx_push(&rx, EX6, sizeof EX6);
        size_t got = rx_next(&rx, buf);
        check_true("example 6 is rejected as bad_crc, nothing decoded",
                   got == 0 && rx.counts[RX_BAD_CRC] >= 1);
    }

    /* Receive path: all six examples with garbage, fed one byte at a time. */
    {
        static rx_t rx;
        memset(&rx, 0, sizeof rx);
        caller_id_t me = {1001, {0}, 0};
        memcpy(me.key, EX_KEY, 16);
        const uint8_t *frames[] = {(const uint8_t *)"\x00\xa5\x13", EX1, EX6, EX2,
                                   (const uint8_t *)"\xa5", EX3, EX4, EX5, EX3};
        size_t lens[] = {3, sizeof EX1, sizeof EX6, sizeof EX2, 1, sizeof EX3, sizeof EX4,
                         sizeof EX5, sizeof EX3};
        enum reason results[16];
        uint8_t types[16];
        int nres = 0;
        for (size_t fi = 0; fi < sizeof lens / sizeof lens[0]; fi++) {
            for (size_t bi = 0; bi < lens[fi]; bi++) {
                rx_push(&rx, frames[fi] + bi, 1);
                size_t flen;
                while ((flen = rx_next(&rx, buf)) > 0 && nres < 16) {
                    types[nres] = buf[3];
                    results[nres++] = caller_accept(&me, buf);
                }
            }
        }
        /* expected: EX1 (uplink, ignored), EX2 (uplink), EX3 accepted, EX4 accepted,
         * EX5 (uplink), EX3 again (replay). EX6 and the garbage never surface. */
        int ok = nres == 6 && types[0] == T_KEY && results[0] == RX_IGN_UPLINK &&
                 types[1] == T_HEARTBEAT && results[1] == RX_IGN_UPLINK && types[2] == T_ACK &&
                 results[2] == RX_OK && types[3] == T_FEEDBACK && results[3] == RX_OK &&
                 types[4] == T_CALLER_ACK && results[4] == RX_IGN_UPLINK &&
                 types[5] == T_ACK && results[5] == RX_REPLAY && me.downlink_mark == 2;
        check_true("receiver: examples decoded in order through a byte stream, "
                   "uplink ignored, replayed ACK rejected",
                   ok);
        caller_id_t other = {1001, {0}, 0}; /* wrong key: all zeros */
        check_true("receiver: example 3 with the wrong key is bad_mac",
                   caller_accept(&other, EX3) == RX_BAD_MAC);
        caller_id_t elsewhere = {1002, {0}, 0};
        memcpy(elsewhere.key, EX_KEY, 16);
        check_true("receiver: example 3 for device 1002 is ignored",
                   caller_accept(&elsewhere, EX3) == RX_IGN_OTHER_DEVICE);
    }

    /* Back-off schedule without jitter: 0, 1.5, 3.5, 6.5, 11.5, 20.5, 29.5, then +9 s */
    {
        static const double want[] = {0, 1.5, 3.5, 6.5, 11.5, 20.5, 29.5, 38.5, 47.5};
        double t = 0;
        int ok = 1;
        for (unsigned i = 0; i < sizeof want / sizeof want[0]; i++) {
            if (t < want[i] - 1e-9 || t > want[i] + 1e-9) ok = 0;
            double b = i >= 4 ? 8.0 : 0.5 * (double)(1u << i);
            t += ACK_TIMEOUT_S + b;
        }
        check_true("retransmission schedule 0, 1.5, 3.5, 6.5, 11.5, 20.5, 29.5, +9 s", ok);
    }

    if (failures) {
        printf("selftest: %d check(s) FAILED\n", failures);
        return 1;
    }
    printf("selftest: all checks OK\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "selftest") == 0) return run_selftest();
    return run_caller(argc, argv);
}
