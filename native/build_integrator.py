from cffi import FFI
ffibuilder = FFI()
ffibuilder.cdef("int add(int, int);")
ffibuilder.set_source("cngmrv.native._integrator", "int add(int a, int b){return a+b;}")
