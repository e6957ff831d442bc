"""Channel-mixing layers from the forks: ShuffleChannel (ShuffleNet), Axpy (SENet), Reorg (YOLO v2).

ShuffleChannel is a fixed permutation of the channels, so forward and backward are
one transposed copy each. Axpy fuses SENet's channel-wise rescaling with the residual
addition.
"""
import numpy as np

from ..layer import Layer, register_layer

__all__ = ["ShuffleChannelLayer", "AxpyLayer", "ReorgLayer"]


def _refuse_in_place(layer, bottom, top):
    if any(t is b or t.shares_data_with(b) for t in top for b in bottom):
        raise layer.error(f"{layer.type} does not allow in-place computation; give the top "
                          f"its own name")


@register_layer("ShuffleChannel")
class ShuffleChannelLayer(Layer):
    """(N, C, *S) -> (N, C, *S): channel i * (C/g) + j moves to j * g + i (g = group).

    The channels, viewed as a (g, C/g) matrix, are transposed to (C/g, g): ShuffleNet's
    channel shuffle (farmingyard/ShuffleNet's shuffle_channel_param { group }).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.group = self.layer_param.shuffle_channel_param.group
        if self.group <= 0:
            raise self.error(f"shuffle_channel_param.group must be positive, got {self.group}")

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        if bottom[0].num_axes < 2:
            raise self.error(f"input needs a channel axis (axis 1), got shape {bottom[0].shape}")
        channels = bottom[0].shape[1]
        if channels % self.group:
            raise self.error(f"the {channels} input channels are not divisible by group {self.group}")
        top[0].reshape_like(bottom[0])

    def _grouped(self, array, rows):
        """(N, C, *S) viewed as (N, rows, C/rows, prod(S))."""
        return array.reshape(array.shape[0], rows, array.shape[1] // rows, -1)

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        g, per_group = self.group, x.shape[1] // self.group
        self._grouped(y, per_group)[...] = self._grouped(x, g).transpose(0, 2, 1, 3)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        g, per_group = self.group, dx.shape[1] // self.group
        self._grouped(dx, g)[...] = self._grouped(dy, per_group).transpose(0, 2, 1, 3)


@register_layer("Axpy")
class AxpyLayer(Layer):
    """top = a * x + y with one scale per image and channel (hujie-frank/SENet).

    bottoms: a (N, C) or (N, C, 1, 1), x and y (N, C, *S) of one shape; top like x.
    Gradients: da = sum over S of dtop * x, dx = a * dtop, dy = dtop.
    """

    exact_num_bottom = 3
    exact_num_top = 1

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        a, x, y = bottom
        if a.num_axes < 2 or x.num_axes < 2 or a.shape[:2] != x.shape[:2]:
            raise self.error(f"bottom[0] (the scale) must be (N, C) or (N, C, 1, 1) for x of "
                             f"shape {x.shape}; got {a.shape}")
        if a.num_axes > 2 and any(s != 1 for s in a.shape[2:]):
            raise self.error(f"bottom[0] (the scale) must have size 1 after the channel axis, "
                             f"got shape {a.shape}")
        if x.shape != y.shape:
            raise self.error(f"bottom[1] (x) and bottom[2] (y) must have one shape, got "
                             f"{x.shape} and {y.shape}")
        top[0].reshape_like(x)

    def _scale(self, a, x):
        return a.reshape(x.shape[:2] + (1,) * (x.ndim - 2))

    def forward(self, bottom, top):
        a, x, y = (b.data for b in bottom)
        out = top[0].data
        np.multiply(x, self._scale(a, x), out=out)
        out += y

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        a, x = bottom[0].data, bottom[1].data
        if propagate_down[0]:
            n, c = x.shape[:2]
            bottom[0].diff.reshape(n, c)[...] = np.einsum(
                "ncs,ncs->nc", dy.reshape(n, c, -1), x.reshape(n, c, -1))
        if propagate_down[1]:
            np.multiply(dy, self._scale(a, x), out=bottom[1].diff)
        if propagate_down[2]:
            bottom[2].diff[...] = dy


@register_layer("Reorg")
class ReorgLayer(Layer):
    """YOLO v2's space-to-depth (the Caffe ports' Reorg, reorg_param { stride reverse }).

    (N, C, H, W) -> (N, C*s^2, H/s, W/s), darknet's reorg: the input, read flat as
    (N, C/s^2, H*s, W*s), i.e. as (N, C/s^2, H, s, W, s) with axes (n, c2, h, dy, w, dx),
    is written flat, in (N, C, H, W) order, as element (n, (dy*s + dx) * C/s^2 + c2, h, w).
    With reverse: true the inverse permutation, (N, C, H, W) -> (N, C/s^2, H*s, W*s).
    Backward applies the inverse permutation (the ports' own backward reads an unset blob).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.reorg_param
        if not p.HasField("stride") or p.stride < 1:
            raise self.error("reorg_param needs a positive stride")
        self.stride, self.reverse = p.stride, p.reverse

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        if bottom[0].num_axes != 4:
            raise self.error(f"input must be (N, C, H, W), got {bottom[0].shape}")
        n, c, h, w = bottom[0].shape
        s = self.stride
        if self.reverse:
            if c % (s * s):
                raise self.error(f"reverse needs channels divisible by stride^2 = {s * s}, got {c}")
            top[0].reshape(n, c // (s * s), h * s, w * s)
        else:
            if c % (s * s) or h % s or w % s:
                raise self.error(f"input {bottom[0].shape}: channels must be divisible by "
                                 f"stride^2 = {s * s} and height and width by stride {s}")
            top[0].reshape(n, c * s * s, h // s, w // s)

    def _space_to_depth(self, src, dst, shape):
        """dst (flat) = darknet's reorg of src (flat); shape: the (N, C, H, W) used for indexing."""
        n, c, h, w = shape
        s = self.stride
        grid = src.reshape(n, c // (s * s), h, s, w, s)
        dst.reshape(n, s, s, c // (s * s), h, w)[...] = grid.transpose(0, 3, 5, 1, 2, 4)

    def _depth_to_space(self, src, dst, shape):
        n, c, h, w = shape
        s = self.stride
        stacked = src.reshape(n, s, s, c // (s * s), h, w)
        dst.reshape(n, c // (s * s), h, s, w, s)[...] = stacked.transpose(0, 3, 4, 1, 5, 2)

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        if self.reverse:
            self._depth_to_space(x, y, x.shape)
        else:
            self._space_to_depth(x, y, x.shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.reverse:
            self._space_to_depth(dy, dx, dx.shape)
        else:
            self._depth_to_space(dy, dx, dx.shape)
