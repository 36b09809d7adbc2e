// attention_heatmap: what each token of a short sentence attends to, as an SVG heatmap.
//
// The seed's design document plots the attention weights of its layer (get_attention_weights in PyTorch).
// This is the same in C++: six tokens, a layer with fixed weights, HeadAttention::attention_weights, and an
// SVG file with one cell per (query, key) pair: token labels on both axes, a colour scale with its values,
// and the cells the causal mask hides drawn hatched, distinct from a weight of zero.
//
//   ./attention_heatmap [output.svg]     (default: attention_heatmap.svg)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <head_attention/attention.hpp>

namespace {

using Layer = head_attention::HeadAttention<double>;
using Index = Eigen::Index;

constexpr Index kEmb = 16;
constexpr Index kHead = 8;

/// A fixed embedding per distinct word (the two "the"s share one), as a model's embedding table would give.
Layer::Matrix embed(const std::vector<std::string>& tokens) {
  Layer::Matrix x(static_cast<Index>(tokens.size()), kEmb);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    std::uint64_t seed = 1469598103934665603ull;  // FNV-1a of the word
    for (const char c : tokens[i])
      seed = (seed ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    std::mt19937_64 engine(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (Index j = 0; j < kEmb; ++j)
      x(static_cast<Index>(i), j) = normal(engine);
  }
  return x;
}

/// White (0) to dark blue (1).
std::string colour(double w) {
  const auto channel = [&](double from, double to) {
    return static_cast<int>(std::lround(from + (to - from) * std::clamp(w, 0.0, 1.0)));
  };
  std::ostringstream out;
  out << "rgb(" << channel(255, 8) << "," << channel(255, 48) << "," << channel(255, 107) << ")";
  return out.str();
}

std::string escape(const std::string& text) {
  std::string out;
  for (const char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

/// The heatmap: queries down the left, keys along the top, one cell per pair.
std::string svg(const std::vector<std::string>& tokens, const Layer::Matrix& weights,
                const Layer::Mask& visible) {
  const int n = static_cast<int>(tokens.size());
  const int cell = 56, left = 90, top = 110, scale_x = left + n * cell + 40, scale_h = n * cell;
  const int width = scale_x + 110, height = top + n * cell + 50;
  std::ostringstream s;
  s << std::fixed << std::setprecision(2);
  s << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
    << "\" viewBox=\"0 0 " << width << " " << height << "\" font-family=\"sans-serif\" font-size=\"14\">\n"
    << "  <title>Causal attention weights of one head</title>\n"
    << "  <defs>\n"
    << "    <pattern id=\"masked\" width=\"8\" height=\"8\" patternUnits=\"userSpaceOnUse\" "
       "patternTransform=\"rotate(45)\">\n"
    << "      <rect width=\"8\" height=\"8\" fill=\"#eeeeee\"/>\n"
    << "      <line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"8\" stroke=\"#aaaaaa\" stroke-width=\"3\"/>\n"
    << "    </pattern>\n"
    << "    <linearGradient id=\"scale\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">\n"
    << "      <stop offset=\"0\" stop-color=\"" << colour(0) << "\"/>\n"
    << "      <stop offset=\"1\" stop-color=\"" << colour(1) << "\"/>\n"
    << "    </linearGradient>\n"
    << "  </defs>\n"
    << "  <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "  <text x=\"20\" y=\"24\" font-size=\"16\" font-weight=\"bold\">Attention weights of one causal head "
       "(emb "
    << kEmb << ", head " << kHead << ")</text>\n"
    << "  <text x=\"" << left + n * cell / 2 << "\" y=\"48\" text-anchor=\"middle\">key</text>\n"
    << "  <text x=\"20\" y=\"" << top + n * cell / 2 << "\" text-anchor=\"middle\" transform=\"rotate(-90 20 "
    << top + n * cell / 2 << ")\">query</text>\n";
  for (int j = 0; j < n; ++j)  // key labels along the top
    s << "  <text x=\"" << left + j * cell + cell / 2 << "\" y=\"" << top - 12
      << "\" text-anchor=\"middle\" class=\"key-label\">" << escape(tokens[static_cast<std::size_t>(j)])
      << "</text>\n";
  for (int i = 0; i < n; ++i) {
    s << "  <text x=\"" << left - 10 << "\" y=\"" << top + i * cell + cell / 2 + 5
      << "\" text-anchor=\"end\" class=\"query-label\">" << escape(tokens[static_cast<std::size_t>(i)])
      << "</text>\n";
    for (int j = 0; j < n; ++j) {
      const int x = left + j * cell, y = top + i * cell;
      if (!visible(i, j)) {
        s << "  <rect class=\"masked\" x=\"" << x << "\" y=\"" << y << "\" width=\"" << cell << "\" height=\""
          << cell << "\" fill=\"url(#masked)\" stroke=\"white\"/>\n";
        continue;
      }
      const double w = weights(i, j);
      s << "  <rect class=\"cell\" x=\"" << x << "\" y=\"" << y << "\" width=\"" << cell << "\" height=\""
        << cell << "\" fill=\"" << colour(w) << "\" stroke=\"white\"><title>"
        << escape(tokens[static_cast<std::size_t>(i)]) << " -> "
        << escape(tokens[static_cast<std::size_t>(j)]) << ": " << w << "</title></rect>\n"
        << "  <text x=\"" << x + cell / 2 << "\" y=\"" << y + cell / 2 + 5
        << "\" text-anchor=\"middle\" fill=\"" << (w > 0.55 ? "white" : "black") << "\" font-size=\"12\">"
        << w << "</text>\n";
    }
  }
  // The colour scale with its values, and the key to the masked cells.
  s << "  <rect x=\"" << scale_x << "\" y=\"" << top << "\" width=\"20\" height=\"" << scale_h
    << "\" fill=\"url(#scale)\" stroke=\"#444444\"/>\n";
  for (int k = 0; k <= 4; ++k) {
    const double value = k / 4.0;
    const int y = top + scale_h - static_cast<int>(value * scale_h);
    s << "  <line x1=\"" << scale_x + 20 << "\" y1=\"" << y << "\" x2=\"" << scale_x + 26 << "\" y2=\"" << y
      << "\" stroke=\"#444444\"/>\n"
      << "  <text x=\"" << scale_x + 30 << "\" y=\"" << y + 5 << "\" class=\"scale-label\">" << value
      << "</text>\n";
  }
  s << "  <rect x=\"" << left << "\" y=\"" << top + n * cell + 16
    << "\" width=\"18\" height=\"18\" "
       "fill=\"url(#masked)\" stroke=\"#444444\"/>\n"
    << "  <text x=\"" << left + 26 << "\" y=\"" << top + n * cell + 30
    << "\">masked (a later token: the causal mask hides it)</text>\n"
    << "</svg>\n";
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : "attention_heatmap.svg";
  const std::vector<std::string> tokens = {"the", "cat", "sat", "on", "the", "mat"};

  const Layer layer(kEmb, kHead, /*max_seq_len=*/16, /*seed=*/7);  // fixed weights
  const Layer::Matrix x = embed(tokens);                           // [6, 16]
  const Layer::Matrix weights = layer.attention_weights(x);        // [6, 6], rows sum to 1
  const Layer::Mask visible = layer.mask(x.rows());                // [6, 6], the causal mask

  std::ofstream out(path);
  out << svg(tokens, weights, visible);
  out.close();
  if (!out) {
    std::cerr << "attention_heatmap: cannot write " << path << '\n';
    return 1;
  }
  std::cout << "attention weights [" << weights.rows() << ", " << weights.cols() << "], row sums";
  for (Index i = 0; i < weights.rows(); ++i)
    std::cout << ' ' << weights.row(i).sum();
  std::cout << "\nwrote " << path << '\n';
  return 0;
}
