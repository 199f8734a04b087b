// Declarations ProcessGroupGloo.hpp needs from Gloo, whose headers the PyTorch wheel does not
// ship. Only names that the header uses through pointers are declared; pso never constructs a
// Gloo object itself (libtorch does, with its own complete types).
#pragma once
