package replicate

import "hash/crc64"

// CRC-64 arithmetic for checking LTX files on several cores. An LTX file's
// checksum is one CRC-64/ISO over its whole byte stream, and the database
// checksum needs a CRC-64 of every page prefixed by its number; computed
// directly, every page is hashed twice, one after the other. With the
// identity crc(A‖B) = crc(A)·x^(8|B|) ⊕ crc(B) (mod the polynomial, with
// Go's pre- and post-inversion), each page is hashed once, anywhere, and
// the results are stitched together in order for the price of a
// multiplication.

var isoTable = crc64.MakeTable(crc64.ISO)

// crcOne is the polynomial 1 in the reflected bit order Go's CRC-64 uses:
// the coefficient of x^0 is the top bit.
const crcOne = uint64(1) << 63

// crcMul multiplies two polynomials modulo the ISO polynomial.
func crcMul(a, b uint64) uint64 {
	var p uint64
	for m := crcOne; a != 0; m >>= 1 {
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

// crcShift returns x^(8n) modulo the ISO polynomial: the factor that moves
// a CRC past n more bytes.
func crcShift(n int64) uint64 {
	r, base := crcOne, crcOne>>8 // x^0, x^8
	for ; n > 0; n >>= 1 {
		if n&1 != 0 {
			r = crcMul(r, base)
		}
		base = crcMul(base, base)
	}
	return r
}

// crcCombine returns the CRC of A‖B from crc(A), crc(B) and the factor
// crcShift(len(B)).
func crcCombine(crcA, crcB, shiftB uint64) uint64 {
	return crcMul(crcA, shiftB) ^ crcB
}
