// Package crc64iso computes the CRC-64/ISO that LTX files use, for their
// file checksums and for the per-page checksums a database checksum is
// made of, faster than hash/crc64 and in pieces that can be combined.
package crc64iso

import (
	"encoding/binary"
	"hash/crc64"
)

// CRC-64 arithmetic for checking LTX files on several cores. An LTX file's
// checksum is one CRC-64/ISO over its whole byte stream, and the database
// checksum needs a CRC-64 of every page prefixed by its number; computed
// directly, every page is hashed twice, one after the other. With the
// identity crc(A‖B) = crc(A)·x^(8|B|) ⊕ crc(B) (mod the polynomial, with
// Go's pre- and post-inversion), each page is hashed once, anywhere, and
// the results are stitched together in order for the price of a
// multiplication.

var table = crc64.MakeTable(crc64.ISO)

// one is the polynomial 1 in the reflected bit order Go's CRC-64 uses:
// the coefficient of x^0 is the top bit.
const one = uint64(1) << 63

// mul multiplies two polynomials modulo the ISO polynomial.
func mul(a, b uint64) uint64 {
	var p uint64
	for m := one; a != 0; m >>= 1 {
		if a&m != 0 {
			p ^= b
			a ^= m
		}
		if b&1 != 0 {
			b = b>>1 ^ crc64.ISO
		} else {
			b >>= 1
		}
	}
	return p
}

// Shift returns x^(8n) modulo the ISO polynomial: the factor that moves
// a CRC past n more bytes.
func Shift(n int64) uint64 {
	r, base := one, one>>8 // x^0, x^8
	for ; n > 0; n >>= 1 {
		if n&1 != 0 {
			r = mul(r, base)
		}
		base = mul(base, base)
	}
	return r
}

// Combine returns the CRC of A‖B from crc(A), crc(B) and the factor
// Shift(len(B)).
func Combine(crcA, crcB, shiftB uint64) uint64 {
	return mul(crcA, shiftB) ^ crcB
}

// Update is crc64.Update(crc, table, p), about twice as fast. The ISO
// polynomial is x^64 + x^4 + x^3 + x + 1, so x^64 ≡ x^4+x^3+x+1 and
// x^128 ≡ x^8+x^6+x^2+1: moving the register past 16 bytes is a handful
// of shifts and XORs instead of sixteen table lookups. Bits that a shift
// pushes past x^63 (the low bits of the word, in this reflected order) are
// collected in q, a polynomial of degree < 8 times x^64, and folded back in
// the same way; that fold cannot overflow again. TestCRCUpdate checks it
// against hash/crc64.
func Update(crc uint64, p []byte) uint64 {
	crc = ^crc
	for len(p) >= 16 {
		v := crc ^ binary.LittleEndian.Uint64(p) // times x^128
		w := binary.LittleEndian.Uint64(p[8:])   // times x^64
		q := v<<62 ^ v<<58 ^ v<<56 ^ w<<63 ^ w<<61 ^ w<<60
		crc = v ^ v>>2 ^ v>>6 ^ v>>8 ^ w ^ w>>1 ^ w>>3 ^ w>>4 ^ q ^ q>>1 ^ q>>3 ^ q>>4
		p = p[16:]
	}
	for _, b := range p {
		crc = table[byte(crc)^b] ^ crc>>8
	}
	return ^crc
}
