#include "textflag.h"
#include "funcdata.h"

// func Grow()
//
// A frame of Frame (8192) bytes, no arguments: the prologue the assembler
// adds checks the stack and calls the runtime to grow it; the body only
// returns. The frame holds no pointers.
TEXT ·Grow(SB), 0, $8192-0
	NO_LOCAL_POINTERS
	RET
