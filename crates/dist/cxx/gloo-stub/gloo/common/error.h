// See ../algorithm.h: a stand-in for the Gloo header the PyTorch wheel does not ship.
#pragma once
