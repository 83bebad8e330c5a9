#include "common/fp16.h"

#include <bit>
#include <cmath>
#include <cstdint>

#include "gtest/gtest.h"

namespace fedtune {
namespace {

TEST(Fp16Test, EveryHalfRoundTripsExactly) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = Fp16ToFp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Fp16ToFp32(Fp32ToFp16(f)))) << h;
      continue;
    }
    EXPECT_EQ(Fp32ToFp16(f), h) << "half 0x" << std::hex << h;
  }
}

TEST(Fp16Test, KnownValues) {
  EXPECT_EQ(Fp16ToFp32(0x3C00), 1.0f);
  EXPECT_EQ(Fp16ToFp32(0xC000), -2.0f);
  EXPECT_EQ(Fp16ToFp32(0x7BFF), 65504.0f);
  EXPECT_EQ(Fp16ToFp32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::isinf(Fp16ToFp32(0x7C00)));
  EXPECT_EQ(Fp32ToFp16(65520.0f), 0x7C00);  // rounds to infinity
  EXPECT_EQ(Fp32ToFp16(1e-9f), 0x0000);
}

TEST(Fp16Test, RoundsToNearestEvenBetweenNeighbours) {
  // Midpoints between consecutive halves round to the even one; slightly above rounds up.
  for (uint16_t h : {uint16_t{0x3C00}, uint16_t{0x3C01}, uint16_t{0x0001}, uint16_t{0x0002}, uint16_t{0x7000}}) {
    const double a = Fp16ToFp32(h), b = Fp16ToFp32(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((a + b) / 2);
    EXPECT_EQ(Fp32ToFp16(mid), (h & 1) ? h + 1 : h) << h;
    EXPECT_EQ(Fp32ToFp16(std::nextafter(mid, 1e9f)), h + 1) << h;
  }
}

TEST(Bf16Test, RoundTripAndRounding) {
  EXPECT_EQ(Bf16ToFp32(Fp32ToBf16(1.0f)), 1.0f);
  EXPECT_EQ(Fp32ToBf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie -> even
  EXPECT_EQ(Fp32ToBf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie -> even (up)
  EXPECT_TRUE(std::isnan(Bf16ToFp32(Fp32ToBf16(NAN))));
}

}  // namespace
}  // namespace fedtune
